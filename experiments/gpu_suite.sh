#!/usr/bin/env bash
# Every GPU measurement still owed, in one device call of about 10 minutes; JSON results under $OUT.
#
#   run(command="bash experiments/gpu_suite.sh", carry=[".upstream"], timeout_s=600)
#
# `.upstream/` (ignored by git) holds the official checkouts the comparisons run beside jaxgen (VAR/, LlamaGen/) and
# `.upstream/pylib` the pure-Python packages the device image lacks (ml_collections; pytorch-fid and torch-fidelity
# for bench_eval: `pip install --no-deps --target .upstream/pylib ml-collections pytorch-fid==0.3.0
# torch-fidelity==0.4.0 torchvision==0.28.0`; bench_eval reads only torchvision's models/inception.py). Without it the jaxgen rows still run. Each step has its own time limit so that one slow
# step cannot eat the others'; a step that fails is logged and the suite goes on. Copy the JSON files into
# experiments/results/ with the device in the name, and the numbers into experiments/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/.upstream/pylib${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/device.txt" 2>&1 || true
OFFICIAL=""
[ -d .upstream/VAR ] && OFFICIAL="--official=.upstream"

step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  tail -3 "$OUT/$name.log"
}

# Step 7 (eval): Inception images/s beside pytorch-fid / torch-fidelity, FID + P/R time on 50,000 x 2048 features.
# The image lacks the fid-helper wheel: random weights, the same speed (--weights random).
step 100 eval python experiments/bench_eval.py --official_path=.upstream/pylib --weights=random --images=256 \
  --batch=64 --out="$OUT/eval_gpu.json"
# Step 5 (kernels): the block-sparse kernel's tiles, tuned on VAR's masks (one call per scale list).
step 100 attention_512px python experiments/bench_attention.py --tune --lists=512px --out="$OUT/attention_512px.json"
step 90 attention_256px python experiments/bench_attention.py --tune --lists=256px --out="$OUT/attention_256px.json"
# Step 4 (tokenizers): bf16 beside the official PyTorch models.
step 75 tokenizer python experiments/bench_tokenizer.py --models=vq16,var_vqvae --dtype=bfloat16 --batch=16 \
  $OFFICIAL --out="$OUT/tokenizer_gpu.json"
# Step 3: the train-step float32 rows (bf16 was measured on an H100).
step 75 train_step_f32 python experiments/bench_train_step.py --mode=speed --dtype=float32 \
  --out="$OUT/train_step_f32.json"
# MaskGIT sampling: the released sizes' parallel decode (8, 12 steps) beside google-research/maskgit's own decode
# (same params; .upstream/maskgit = `git archive HEAD maskgit` of its mirror) and LlamaGen's 256 steps at that size.
step 100 maskgit_sampling python experiments/bench_maskgit_sampling.py --size=released --batch=1,64 --sampler-batch=64 \
  $([ -d .upstream/maskgit/maskgit ] && echo --official=.upstream/maskgit) \
  --official-commit=1db23594e1bd328ee78eadcd148a19281cd0f5b8 --out="$OUT/maskgit_sampling_gpu.json"
# HMAR (bench_hmar.py): the d16 bf16 train step, HMAR block-sparse (pallas) vs VAR dense-masked (xla), the headline
# pair first, then the other backend, then upstream's stage-1 step with its Triton kernel vs SDPA + mask (fp16, as its
# benchmark/training.py). 30 s keeps the limits at ~600 s in all and may end within the first rows (a d16 compile each);
# the JSON is rewritten after every row, so it keeps what finished. The full d16 run (sampling beside the official
# HMAR.generate, stage 2) needs its own device call (experiments/README.md, HMAR section).
# .upstream/hmar = `git -C <NVlabs/HMAR mirror> archive HEAD | tar -x -C .upstream/hmar`.
step 30 hmar python experiments/bench_hmar.py --size=d16 --parts=train,official_train --train-models=hmar,var \
  --backends=pallas,xla --repeats=3 $([ -d .upstream/hmar/models ] && echo --official=.upstream/hmar) \
  --official-commit=595a9df03a9df8152c7b50d96204d76cdd6dc244 --out="$OUT/hmar_gpu.json"
# Axial Transformer (bench_axial.py --preset=gpu): the axial attention op forward + backward, pallas
# (pallas_kernels/axial_attention) vs xla (dense row / column softmax) and cudnn, at the ImageNet64 then 32 model shapes
# (bf16, [8, 64, 64, 16, 128] / [8, 32, 32, 16, 96]), each backend checked against a float32 reference before it is
# timed: the issue's target is pallas >= 1.5x xla at 64x64 (ratios.attention_target). Then, while its 30 s budget
# lasts, the released-width train step (D 2048 / 1536, 8/8/8 layers) and sampler rows; the rest is listed in
# `skipped` (all of them: --preset=gpu_full, its own call, estimated ~6 min). The JSON is rewritten after every row.
step 40 axial python experiments/bench_axial.py --preset=gpu --budget-s=30 --out="$OUT/axial_gpu.json"
echo "done: $(ls "$OUT")"
