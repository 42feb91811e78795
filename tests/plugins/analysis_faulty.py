"""A deliberately broken analysis method for the harness's negative control: a Taylor softmax whose fast path
uses one order more than its reference."""
from attnbench.methods import Capabilities, Prepared, register_method
from attnbench.methods.analysis import taylor


@register_method("t_taylor_off_by_one", Capabilities(family="analysis", exact=False, masks={"full", "causal"}))
def build(ctx):
    causal = ctx.mask.causal

    def attend(order):
        return lambda q, k, v: taylor.polynomial_attention(q, k, v, weight=lambda s: taylor.taylor_weights(s, order),
                                                           causal=causal, offset=0, chunk=64, eps=1e-6)

    return Prepared(fn=attend(3), reference=attend(2))
