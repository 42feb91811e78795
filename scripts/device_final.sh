#!/usr/bin/env bash
# One device call on the 2-GPU machine: finish the core GPU sweep (re-running failed cases) and the
# self-check on GPU 0 while GPU 1 runs half of the mask sweep; GPU 0 then runs the other half.
# Everything lands in one archive under $OUT (the device tool returns at most 8 files).
set -u
R=results
run() { timeout "$1" scripts/device_run.sh "${@:2}" 2>&1 | grep -v "case/s\|s/case" | tail -25; }
MASKS_A='[full,causal,"sliding_window(left=4096)","sliding_window(left=2048,right=2048)","dilated_sliding_window(left=4096,dilation=2)","chunked_local(chunk=8192)","document(mean_length=4096)","document(causal=True,mean_length=4096)","prefix_lm(prefix=2048)"]'
MASKS_B='["document_prefix_lm(mean_length=4096)","shared_question(question=2048,num_answers=4)","block_causal(block=1024)","block_causal_document(mean_length=8192,frame=1024)","longformer(left=2048,right=2048,global_tokens=64)","bigbird(block=128,global_blocks=2,window_blocks=3,random_blocks=3)","sparse_strided(stride=256)","sparse_fixed(stride=256,summary=16)","random_block_sparse(block=128,density=0.1)"]'
( run 465 sweep=masks device=cuda:1 results_dir=$R run_id=h200-masks-a "masks=$MASKS_A" > $OUT/masks-a.txt ) &
( run 200 sweep=gpu device=cuda:0 results_dir=$R run_id=h200x2-gpu retry=[error] case_timeout_s=240 > $OUT/gpu.txt
  timeout 80 scripts/device_run.sh selfcheck --rounds 3 --out $R/selfcheck-h200.json > $OUT/selfcheck.txt 2>&1
  run $((470 - SECONDS)) sweep=masks device=cuda:0 results_dir=$R run_id=h200-masks-b "masks=$MASKS_B" > $OUT/masks-b.txt ) &
wait
tar czf $OUT/runs.tgz $R/h200x2-gpu $R/h200-masks-a $R/h200-masks-b $R/selfcheck-h200.json 2>/dev/null
tail -5 $OUT/gpu.txt $OUT/selfcheck.txt $OUT/masks-a.txt $OUT/masks-b.txt
