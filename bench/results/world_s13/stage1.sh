set -x
cd /work/hip
date
time python -m engine.evaluate train-classifier --images 6144 --epochs 20 --cache runs/classifier_data.pt --threads 2
date
time python -m engine.priors.train_embedded --out runs/embedded --steps 7200 --minutes 106 --seed 1 --threads 2 --export assets
date
time python -m engine.evaluate prior-samples --n 4 --steps 25 --cfg 2 --threads 2 --grid runs/s13/samples.png
date
time python bench/bench_view_blend.py --prompts 'a red cube' 'a red mug' 'an orange mug' 'a red house' --json runs/s13/view_blend.json
date
