# Rule 7's order (RULE.md); every step appends to runs/s17/chain.log; step 4 runs only past its gate.
set -x
cd /work/main
R=bench/results/gable_s17
W=$R/embedded_prior.safetensors
P=("a red cube" "a green cone" "an orange mug" "a yellow cylinder" "a red house" "a pink snowman")
row() { python bench/bench_ablation.py --jobs 2 --steps 2000 --seconds 300 --seed 3 --seeds 3 --views 32 --prior "embedded:$W" --rows "$1" --prompts "${P[@]}" --out $R/$2.json; }
date
python -m engine.priors.train_embedded --out runs/s17/embedded --steps 7200 --minutes 106 --seed 1 --threads 2 --export $R || exit 2
date
python -m engine.evaluate prior-samples --n 4 --steps 25 --cfg 2 --threads 2 --weights $W --grid $R/samples.png > $R/samples.txt 2>&1; tail -5 $R/samples.txt
date; row base row1; date; row '+view aug' row2; date; row '+view-dependent prompts' row3; date; row '+lighting' row4; date
python bench/bench_ablation.py --from-json $R/row1.json $R/row2.json $R/row3.json $R/row4.json --power
python - <<'PY' || exit 3
import json, re, sys
from engine.protocol import paired_steps, ABLATION
R = "bench/results/gable_s17"
runs = [r for n in (1, 2, 3, 4) for r in json.load(open(f"{R}/row{n}.json"))["runs"]]
st = paired_steps(runs, list(ABLATION)[:4]); print("GATE steps", st)
txt = open(f"{R}/samples.txt").read(); m = re.findall(r'"both[^"]*"\s*:\s*([0-9.]+)', txt); print("GATE samples", m)
ok = all(st[k]["mean"] >= 0 for k in st) and m and float(m[0]) >= 0.90
print("GATE", "PASS" if ok else "FAIL"); sys.exit(0 if ok else 1)
PY
row '+textureless' row5; date
python bench/bench_sds_prompts.py --jobs 2 --steps 2000 --seconds 300 --seed 0 --prior "embedded:$W" --json $R/protocol_seed0.json; date
python bench/bench_sds_prompts.py --jobs 2 --steps 2000 --seconds 300 --seed 1 --prior "embedded:$W" --json $R/protocol_seed1.json; date
