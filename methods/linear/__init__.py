"""Linear-time, recurrent, spectral and higher-order attention (methods-spec §7-12), each method in its own
module; shared skeleton in ``common``. fla-core backends register only where ``fla`` imports."""
from . import (aaren, abc, cosformer, fla_backends, gated_delta, infsa, linear_attn, lla, nystrom, performer, rfa,  # noqa: F401
               s4d, softmax_rnn, tensor_attn)
