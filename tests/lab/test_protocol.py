"""The SDS protocol and the Fig. 6 ablation's configurations (lab/protocol.py)."""

import json

import torch

from engine.presets import preset
from engine.priors import load_prior
from engine.shading import pick_shading
from lab import protocol


def test_prompts_span_the_vocabulary():
    from engine.evaluate import parse_prompt
    from engine.world import COLORS, FRONT_SHAPES, SHAPES

    parsed = [parse_prompt(p) for p in protocol.PROMPTS]
    assert len(parsed) >= 10
    assert {c for c, _ in parsed} == set(COLORS) and {s for _, s in parsed} == set(SHAPES)
    assert sum(s == "cube" for _, s in parsed) >= 2 and set(FRONT_SHAPES) <= {s for _, s in parsed}


def test_ablation_rows_add_one_component_each():
    cfgs = {}
    for name, settings in protocol.ABLATION.items():
        cfgs[name] = preset("embedded").with_settings(settings)
    base, aug, dep, light, full = cfgs.values()
    assert not base.sds.view_dependent and base.camera.focal_range == (1.0, 1.0)
    assert aug.camera == preset("embedded").camera and not aug.sds.view_dependent
    assert dep.sds.view_dependent and dep.shading == base.shading
    g = torch.Generator().manual_seed(0)
    modes = lambda cfg: {pick_shading("random", cfg.shading, 500, g) for _ in range(200)}  # noqa: E731
    assert modes(base) == {"albedo"} and modes(light) == {"albedo", "lambertian"}
    assert modes(full) == {"albedo", "lambertian", "textureless"}
    # lighting starts shading when the product does: after the preset's albedo-only warm-up
    assert light.shading.albedo_only_steps == full.shading.albedo_only_steps < 10**9
    assert full.to_dict() == preset("embedded").to_dict()  # the last row is the product's defaults


def test_embedded_preset_carries_its_tuned_settings():
    from engine.config import Config
    from engine.presets import EMBEDDED

    cfg, plain = preset("embedded"), Config()
    assert cfg.reg.entropy == EMBEDDED["reg.entropy"] != plain.reg.entropy
    assert cfg.field.blob_density == EMBEDDED["field.blob_density"] != plain.field.blob_density
    for other in ("oracle:cube", "sd", "if"):  # the other priors keep the peers' blob and entropy
        assert preset(other).field.blob_density == plain.field.blob_density
        assert preset(other).reg.entropy == plain.reg.entropy


def test_run_prompt_trains_within_budget_and_scores(tmp_path):
    prior = load_prior("oracle:sphere")
    cfg = preset("oracle:sphere")
    res = protocol.run_prompt("a red sphere", prior, cfg=cfg, max_steps=12, max_seconds=60, n_views=2)
    trainer = res.pop("trainer")
    assert res["steps"] == trainer.step_count == 12 and res["its_per_s"] > 0
    assert 0 <= res["colour_r_precision"] <= 1 and 0 <= res["geometry_r_precision"] <= 1
    res = protocol.run_prompt("a red sphere", prior, cfg=preset("oracle:sphere"), max_steps=10**6, max_seconds=1.0,
                              n_views=2)
    assert 1 <= res["steps"] < 10**6  # the wall-clock budget stops it
    summary = protocol.summarize([res, {**res, "colour_r_precision": 0.0}])
    assert summary["prompts"] == 2 and summary["colour_r_precision"] == round(res["colour_r_precision"] / 2, 3)


def test_overrides_reach_config_and_live_params():
    import pytest

    from engine.config import LiveParams

    cfg, live = protocol.apply_overrides(preset("embedded"), LiveParams(),
                                         ["sds.t_max_end=0.4", "reg.entropy=0.1", "camera.focal_range=[1,1]",
                                          "live.guidance_scale=20", "live.prompt=a blue cone"])
    assert cfg.sds.t_max_end == 0.4 and cfg.reg.entropy == 0.1 and cfg.camera.focal_range == (1, 1)
    assert live.guidance_scale == 20 and live.prompt == "a blue cone"
    for bad in ("sds.nothing=1", "entropy=0.1", "live.guidance_scale=NaN"):
        with pytest.raises(ValueError):
            protocol.apply_overrides(preset("embedded"), LiveParams(), [bad])


def test_summary_gives_the_standard_error_of_geometry():
    rows = [{"geometry_r_precision": g, "colour_r_precision": 1.0} for g in (0.25, 0.75, 0.5, 0.5)]
    s = protocol.summarize(rows)
    assert s["geometry_r_precision"] == 0.5 and s["prompts"] == 4
    assert abs(s["geometry_se"] - (1 / 24) ** 0.5 / 2) < 1e-3  # stdev sqrt(1/24) over sqrt(4) runs
    assert protocol.summarize(rows[:1])["geometry_se"] is None


def test_paired_steps_compare_rows_run_by_run():
    """Each row's change from the row before is taken over runs with the same prompt and seed, so what a
    prompt adds to both rows cancels: here the prompts differ by 0.5 and every run gains exactly 0.25."""
    rows = [{"row": row, "prompt": p, "seed": s, "geometry_r_precision": base + gain}
            for row, gain in (("a", 0.0), ("b", 0.25)) for p, base in (("x", 0.0), ("y", 0.5)) for s in (0, 1)]
    rows.append({"row": "c", "prompt": "x", "seed": 0, "geometry_r_precision": 0.0})  # one shared run
    steps = protocol.paired_steps(rows, ["a", "b", "c"])
    assert steps["b"] == {"mean": 0.25, "se": 0.0, "n": 4, "sd": 0.0}
    assert steps["c"] == {"mean": -0.25, "se": None, "n": 1, "sd": None}
    assert protocol.summarize([r for r in rows if r["row"] == "b"])["geometry_se"] > 0.1  # unpaired: large


def test_pairs_to_resolve_a_step():
    """A step's sign stands at 2 s.e. once n >= (2 sd / |mean|)^2: a +0.05 step with pairs spread 0.2 needs 64
    runs, a quarter of the spread a sixteenth of them; a zero mean or an unknown spread has no such n."""
    assert protocol.pairs_to_resolve(0.05, 0.2) == 64
    assert protocol.pairs_to_resolve(-0.05, 0.05) == 4
    assert protocol.pairs_to_resolve(0.05, 0.2, z=1.0) == 16
    assert protocol.pairs_to_resolve(0.0, 0.2) is None and protocol.pairs_to_resolve(0.1, None) is None


def test_jobs_carry_the_run_options_asked_for(tmp_path):
    """--views N scores every run on N views (bench_sds_prompts.py once kept the default 16 silently): the options
    of `add_run_args` reach each job through `job_of`, and the run through `run_protocol`."""
    import argparse

    ap = argparse.ArgumentParser()
    protocol.add_run_args(ap, protocol.PROMPTS, steps=2000, seconds=300.0)
    args = ap.parse_args(["--prompts", "a red sphere", "--prior", "oracle:sphere", "--steps", "3", "--seconds", "30",
                          "--views", "3", "--seed", "2", "--set", "reg.entropy=0.1"])
    job = protocol.job_of(args, args.prompts[0], preview=str(tmp_path / "p.png"))
    assert job == {"prompt": "a red sphere", "steps": 3, "seconds": 30.0, "seed": 2, "prior": "oracle:sphere",
                   "set": ["reg.entropy=0.1"], "views": 3, "preview": str(tmp_path / "p.png")}
    assert protocol.job_of(args, "a red sphere", seed=5, row="base")["seed"] == 5
    (row,) = protocol.run_protocol([job], tmp_path / "batch", workers=1, progress=False)
    assert row["n_views"] == 3 and row["steps"] == 3 and row["seed"] == 2 and (tmp_path / "p.png").stat().st_size > 0


def test_the_protocol_bench_goes_on_where_its_json_stopped(tmp_path, monkeypatch):
    """lab/sweep.py (bench_sds_prompts.py) --seeds --grid: runs go seed by seed, one summary per setting; --json keeps each run
    and the same file again runs only the runs it lacks (a protocol longer than a session resumes)."""
    import json

    from lab import sweep  # the code of bench/bench_sds_prompts.py

    asked = []

    def fake(jobs, out, workers=2, progress=True, on_event=None, score_at=()):  # scores from the setting alone
        asked.append([(j["seed"], j["set"][-1]) for j in jobs])
        geo = {'live.distillation="sds"': 1.0, 'live.distillation="csd"': 0.5}
        return [{"run_id": protocol.spec_of(j).run_id, "prompt": j["prompt"], "seed": j["seed"], "status": "done",
                 "steps": 3, "wall_s": 1.0, "its_per_s": 3.0, "colour_r_precision": 1.0, "translucent_share": 0.1,
                 "geometry_r_precision": geo[j["set"][-1]] - 0.25 * j["seed"],
                 "scores": {str(k): {"colour_r_precision": 0.5, "translucent_share": 0.3,
                                     "geometry_r_precision": geo[j["set"][-1]] / 2} for k in score_at}} for j in jobs]

    monkeypatch.setattr(sweep, "run_protocol", fake)
    args = ["--prompts", "a red cube", "a blue sphere", "--steps", "3", "--seeds", "0,1", "--grid",
            "live.distillation=sds,csd", "--json", str(tmp_path / "p.json"), "--out", str(tmp_path / "out"),
            "--batch", str(tmp_path / "b"), "--score-at", "2"]
    (tmp_path / "p.json").write_text(json.dumps({"rows": fake(
        [protocol.job_of(argparse_ns(), "a red cube", seed=1, set=['live.distillation="csd"'])], None)}))
    asked.clear()
    groups = sweep.main(args)["groups"]
    assert [sorted({s for s, _ in batch}) for batch in asked] == [[0], [1]]
    assert len(asked[0]) == 4 and len(asked[1]) == 3  # seed 1's csd run of the red cube was in the file
    assert groups['live.distillation=sds']["geometry_r_precision"] == 0.875
    assert groups['live.distillation=csd']["runs"] == 4 and groups['live.distillation=csd']["seeds"] == [0, 1]
    at = groups['live.distillation=csd']["at"]["2"]  # the scores on the way (--score-at), of the 3 runs that have them
    assert at["runs"] == 3 and at["geometry_r_precision"] == 0.25 and at["translucent_share"] == 0.3
    assert "| live.distillation=csd | 4 | 0.50 | 0.250" in sweep.summary_table(groups)
    assert len(json.loads((tmp_path / "p.json").read_text())["rows"]) == 8
    asked.clear()
    assert sweep.main(args)["groups"] == groups and asked == []


def argparse_ns():
    import argparse

    ap = argparse.ArgumentParser()
    protocol.add_run_args(ap, protocol.PROMPTS, steps=3, seconds=300.0)
    return ap.parse_args([])


def test_the_protocol_bench_resumes_an_interrupted_batch_folder(tmp_path):
    """An interrupted seed's folder holds all its runs or the ones it had to do: the same set goes back to it
    (the batch runner then skips and resumes); another set gets a folder of its own."""
    import json

    from lab import sweep  # the code of bench/bench_sds_prompts.py

    every = [protocol.job_of(argparse_ns(), p) for p in ("a red cube", "a blue sphere", "a green cone")]
    todo = every[1:]
    folder = tmp_path / "b-s0"
    assert sweep._resumable(todo, every, folder) == (todo, folder)  # no folder yet

    def holding(jobs):
        folder.mkdir(exist_ok=True)
        (folder / "manifest.json").write_text(json.dumps({"runs": [{"run_id": protocol.spec_of(j).run_id} for j in jobs]}))

    holding(every)
    assert sweep._resumable(todo, every, folder) == (every, folder)
    holding(todo)
    assert sweep._resumable(todo, every, folder) == (todo, folder)
    holding(every[:1])
    jobs, other = sweep._resumable(todo, every, folder)
    assert jobs == todo and other != folder and other.name.startswith("b-s0-")


def in_process_batch(specs, out, *, outputs, on_event, checkpoint_every, **_):
    """The batch runner's part in `run_protocol`, in this process with one real `Worker` (no Ray): segments of
    `checkpoint_every` steps, each checkpoint written to the run's folder and then heard, as the driver does."""
    from safetensors.torch import load

    from engine.batch import Worker
    from engine.checkpoint import write_checkpoint

    worker, rows = Worker(), []
    for spec in specs:
        row, reply = {"run_id": spec.run_id, "prompt": spec.prompt, "seed": spec.seed, "files": {}, "scores": {}}, {}
        while not reply.get("done"):
            reply = worker.advance(spec, None, checkpoint_every, outputs)
            write_checkpoint(out / spec.run_id, reply["meta"], load(reply["weights"]))
            row.update(step=reply["step"], wall_s=round(reply["train_s"], 2), scores={**row["scores"], **reply["scores"]})
            on_event({"kind": "checkpoint", "run_id": spec.run_id, "step": reply["step"]})
        rows.append({**row, **reply["evaluation"], "status": "done", "its_per_s": reply["its_per_s"]})
    return rows


def test_one_run_is_scored_at_each_eval_step_with_its_training_seconds(tmp_path, monkeypatch):
    """--eval-at 2,4 on a 4-step run: one run, scored at 2 on its way and at 4 by its final evaluation, each with
    the training seconds to that step (a checkpoint at each eval step holds them; the seconds to the last are the
    run's own wall_s)."""
    monkeypatch.setattr(protocol, "run_batch", in_process_batch)
    events = []
    job = {"prompt": "a red cube", "steps": 4, "seconds": None, "seed": 0, "prior": "oracle:cube", "views": 2,
           "set": ["render.resolution=16", "render.num_samples=24"]}
    (row,) = protocol.run_protocol([job], tmp_path / "b", progress=False, on_event=events.append, score_at=(4, 2))
    assert [e["step"] for e in events] == [2, 4]  # a checkpoint at each eval step, heard by the caller too
    assert set(row["scores"]) == {"2", "4"} and row["steps"] == 4
    two, four = row["scores"]["2"], row["scores"]["4"]
    assert 0 <= two["colour_r_precision"] <= 1 and 0 <= two["geometry_r_precision"] <= 1
    assert 0 < two["wall_s"] <= four["wall_s"] == row["wall_s"]
    assert four["geometry_r_precision"] == row["geometry_r_precision"]  # the final evaluation, not a second one
    saved = json.loads((tmp_path / "b" / row["run_id"] / protocol.SECONDS_AT).read_text())
    assert saved == {"2": two["wall_s"], "4": four["wall_s"]}


def test_an_unfinished_run_resumes_only_with_its_scores_on_the_way(tmp_path):
    """A batch stopped by a signal writes the scores taken so far to its manifest, and the seconds file sits beside
    the checkpoint: the run resumes. Killed hard, the manifest lacks them: the run's folder goes (redone)."""
    from safetensors.torch import save_file

    from engine.checkpoint import META, WEIGHTS

    out = tmp_path / "b"
    for run_id in ("kept", "lost"):  # each with a checkpoint at step 3 and the seconds to step 2
        (out / run_id).mkdir(parents=True)
        save_file({"x": torch.zeros(1)}, str(out / run_id / WEIGHTS), metadata={"step": "3"})
        (out / run_id / META).write_text("{}")
        (out / run_id / protocol.SECONDS_AT).write_text(json.dumps({"2": 1.5}))
    runs = [{"run_id": "kept", "status": "pending", "scores": {"2": {}}}, {"run_id": "lost", "status": "running"}]
    (out / "manifest.json").write_text(json.dumps({"batch": "k", "runs": runs}))
    protocol._redo_unscored(out, (2, 4))
    assert (out / "kept" / WEIGHTS).exists() and not (out / "lost").exists()


def test_the_steps_table_gives_each_setting_at_each_step(tmp_path):
    """lab/sweep.py with --eval-at: one table, setting x step -> runs, mean colour and geometry R-Precision, the
    share of runs meeting both targets (colour >= 0.9, geometry >= 0.8) and the mean training seconds."""
    from lab import sweep

    def run(prompt, seed, geo):
        return {"run_id": f"{prompt}-{seed}", "prompt": prompt, "seed": seed, "status": "done", "colour_r_precision": 1.0,
                "geometry_r_precision": geo, "translucent_share": 0.1, "its_per_s": 10.0, "wall_s": 20.0,
                "scores": {"10": {"colour_r_precision": 0.5, "geometry_r_precision": geo / 2, "wall_s": 1.0},
                           "20": {"colour_r_precision": 1.0, "geometry_r_precision": geo, "wall_s": 2.0 + seed}}}

    g = sweep._row_summary([run("a", 0, 1.0), run("b", 1, 0.5)])
    assert g["targets_met"] == 0.5 and g["at"]["10"]["targets_met"] == 0.0 and g["at"]["20"]["targets_met"] == 0.5
    assert g["at"]["20"]["wall_s"] == 2.5 and g["at"]["10"]["runs"] == 2
    table = sweep.steps_table({"field.backbone=grid": g})
    assert "| field.backbone=grid | 10 | 2 | 0.50 | 0.375 | 0.00 | 1.0 |" in table
    assert "| field.backbone=grid | 20 | 2 | 1.00 | 0.750 | 0.50 | 2.5 |" in table


def test_the_json_keeps_the_runs_of_settings_not_asked_for(tmp_path, monkeypatch):
    """The splat half of a protocol run alone (--grid field.backbone=gaussians) adds its rows to the file that
    holds the NeRF half's, rather than writing over them."""
    from lab import sweep

    def fake(jobs, out, workers=2, progress=True, on_event=None, score_at=()):
        return [{"run_id": protocol.spec_of(j).run_id, "prompt": j["prompt"], "seed": j["seed"], "status": "done",
                 "steps": 3, "wall_s": 1.0, "its_per_s": 3.0, "colour_r_precision": 1.0, "geometry_r_precision": 1.0,
                 "translucent_share": 0.1} for j in jobs]

    monkeypatch.setattr(sweep, "run_protocol", fake)
    args = ["--prompts", "a red cube", "--steps", "3", "--json", str(tmp_path / "p.json"), "--out", str(tmp_path / "o"),
            "--batch", str(tmp_path / "b")]
    sweep.main(args + ["--grid", "field.backbone=grid"])
    sweep.main(args + ["--grid", "field.backbone=gaussians", "--batch", str(tmp_path / "b2")])
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert sorted(r["group"] for r in rows) == ["field.backbone=gaussians", "field.backbone=grid"]
