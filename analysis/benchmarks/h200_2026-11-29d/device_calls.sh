#!/bin/bash
# Session 2026-11-29d, call 1: graphs base, all variants, peft included (same process); profile LoRA vs AdaLoRA every 10.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind
O=/tmp/o1; rm -rf $O; mkdir -p $O
pack() { tar czf $OUT/r.tgz -C $O . ; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; lscpu | grep -i "model name"; git log --oneline | head -1; python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"; } > $O/env.txt 2>&1
B="python -m experiments.benchmark --device cuda --warmup 3"
s=$SECONDS; timeout 430 $B --suite base:bf16:graphs --variants floor,lora,adalora,adalora_every10,adalora_compact,lora_final,peft_lora,peft_adalora --rounds 6 --steps 10 --alloc_layers "" --out $O/graphs > $O/log_graphs_base.txt 2>&1; echo "graphs base rc $? $((SECONDS-s)) s" >> $O/times.txt; pack
s=$SECONDS; timeout $((575 - SECONDS)) python .carry/prof3.py graphs base lora adalora_every10 > $O/prof_graphs.txt 2>&1; echo "prof rc $? $((SECONDS-s)) s" >> $O/times.txt; pack
#!/bin/bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind
O=/tmp/o2; rm -rf $O; mkdir -p $O
pack() { tar czf $OUT/r.tgz -C $O . ; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; lscpu | grep -i "model name"; git log --oneline | head -1; } > $O/env.txt 2>&1
B="python -m experiments.benchmark --device cuda --warmup 3"
s=$SECONDS; timeout 100 python .carry/diag_copy.py floor lora > $O/diag_copy.txt 2>&1; echo "diag rc $? $((SECONDS-s)) s" >> $O/times.txt; pack
s=$SECONDS; timeout 170 $B --suite base:bf16 --rounds 5 --steps 10 --alloc_layers 12,48,96 --alloc_steps 10 --out $O/eager > $O/log_eager_base.txt 2>&1; echo "eager base rc $? $((SECONDS-s)) s" >> $O/times.txt; pack
#!/bin/bash
# Session 2026-11-29d, call 3: graphs large (the layout fix on the large shape, peft LoRA beside it); eager large.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind
O=/tmp/o3; rm -rf $O; mkdir -p $O
pack() { tar czf $OUT/r.tgz -C $O . ; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; lscpu | grep -i "model name"; git log --oneline | head -1; } > $O/env.txt 2>&1
B="python -m experiments.benchmark --device cuda --warmup 3"
s=$SECONDS; timeout 370 $B --suite large:bf16:graphs --variants floor,lora,adalora_every10,peft_lora --rounds 4 --steps 8 --alloc_layers "" --out $O/graphs > $O/log_graphs_large.txt 2>&1; echo "graphs large rc $? $((SECONDS-s)) s" >> $O/times.txt; pack
s=$SECONDS; timeout $((585 - SECONDS)) $B --suite large:bf16 --rounds 4 --steps 8 --alloc_layers "" --out $O/eager > $O/log_eager_large.txt 2>&1; echo "eager large rc $? $((SECONDS-s)) s" >> $O/times.txt; pack
# Session 2026-11-29d, calls 4 and 5, on the machine left warm by call 3 (same host, inductor cache kept):
python -m experiments.benchmark --device cuda --warmup 3 --suite large:bf16:graphs --variants floor,lora,adalora_every10 --rounds 4 --steps 8 --alloc_layers "" --out $OUT/g
python -m experiments.benchmark --device cuda --warmup 5 --suite base:bf16:graphs --variants floor,lora,adalora_every10 --rounds 6 --steps 10 --alloc_layers "" --out $OUT/b
