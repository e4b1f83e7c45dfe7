cd /work/main
R=bench/results/gable_s17
P=("a red cube" "a green cone" "an orange mug" "a yellow cylinder" "a red house" "a pink snowman")
date
python bench/bench_ablation.py --jobs 2 --steps 2000 --seconds 300 --seed 9 --seeds 3 --views 32 --rows '+view aug' --prompts "${P[@]}" --out $R/row2_s9.json; date
python bench/bench_ablation.py --jobs 2 --steps 2000 --seconds 300 --seed 9 --seeds 3 --views 32 --rows '+view-dependent prompts' --prompts "${P[@]}" --out $R/row3_s9.json; date
python bench/bench_ablation.py --from-json bench/results/ablation_s10/row2.json bench/results/ablation_s10/row3.json bench/results/ablation_s11/row2.json bench/results/ablation_s11/row3.json $R/row2_s9.json $R/row3_s9.json --power
