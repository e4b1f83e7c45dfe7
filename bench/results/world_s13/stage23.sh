# Stage 2 then 3 of RULE.md; each step appends to the log, a gate stops the chain.
set -x
cd /work/hip
P=("a red cube" "a green cone" "an orange mug" "a yellow cylinder" "a red house" "a pink snowman")
row() { python bench/bench_ablation.py --jobs 2 --steps 2000 --seconds 300 --seed 3 --seeds 3 --views 32 --rows "$1" --prompts "${P[@]}" --out runs/s13/$2.json; }
date; row base row1; date; row '+view aug' row2; date; row '+view-dependent prompts' row3; date
python - <<'PY' || exit 3
import json, sys
from engine.protocol import paired_steps, ABLATION
runs = [r for n in (1, 2, 3) for r in json.load(open(f"runs/s13/row{n}.json"))["runs"]]
st = paired_steps(runs, list(ABLATION)[:3]); print("STAGE2", st)
ok = all(st[k]["mean"] >= 0 for k in st); print("STAGE2", "PASS" if ok else "FAIL"); sys.exit(0 if ok else 1)
PY
python bench/bench_sds_prompts.py --jobs 2 --steps 2000 --seconds 300 --seed 0 --save-runs --out runs/s13/protocol --json runs/s13/protocol_seed0.json; date
python bench/bench_sds_prompts.py --jobs 2 --steps 2000 --seconds 300 --seed 1 --save-runs --out runs/s13/protocol_seed1 --json runs/s13/protocol_seed1.json; date
row '+lighting' row4; date; row '+textureless' row5; date
python bench/bench_ablation.py --from-json runs/s13/row1.json runs/s13/row2.json runs/s13/row3.json runs/s13/row4.json runs/s13/row5.json
date
