"""Bad input everywhere a user or an API client can type, against a running session and the CLI.

Each case must give one clear message (a ValueError / gr.Error naming the value, or exit status 2 with
`error: ...` from the CLI) while the running session goes on with its last good values. The table in
docs/troubleshooting.md is this file's output: `python tests/test_bad_input.py` prints it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.__main__ import main as cli
from engine.checkpoint import CheckpointError, read_checkpoint
from engine.export import safe_path
from engine.testing import tiny_config, tiny_live, wait_for

GOOD = {"guidance_scale": 12.0, "light_azimuth": 30.0, "ambient": 0.2, "learning_rate": 0.02}
NAN, BIG = float("nan"), "a red cube " * 1000  # 11 kB

# (case, where, call: kind and arguments, words the message must contain; None: accepted)
API_CASES = [
    ("empty prompt", "/set_params", {"prompt": ""}, "prompt must be a non-empty"),
    ("blank prompt", "/set_params", {"prompt": "   "}, "prompt must be a non-empty"),
    ("11 kB prompt", "/set_params", {"prompt": BIG}, "the limit is 2000"),
    ("11 kB negative prompt", "/set_params", {"negative_prompt": BIG}, "negative_prompt must be"),
    ("guidance NaN", "/set_params", {"guidance_scale": NAN}, "guidance_scale must be a finite number"),
    ("guidance infinite", "/set_params", {"guidance_scale": math.inf}, "guidance_scale must be a finite"),
    ("guidance negative", "/set_params", {"guidance_scale": -5.0}, "in [0, 200]"),
    ("guidance 1e6", "/set_params", {"guidance_scale": 1e6}, "in [0, 200]"),
    ("guidance not a number", "/set_params", {"guidance_scale": "lots"}, "guidance_scale must be a number"),
    ("light azimuth 1000", "/set_params", {"light_azimuth": 1000.0}, "light_azimuth must be"),
    ("light elevation NaN", "/set_params", {"light_elevation": NAN}, "light_elevation must be"),
    ("light distance 0", "/set_params", {"light_distance": 0.0}, "light_distance must be"),
    ("light colour not a colour", "/set_params", {"light_color": "#zzzzzz"}, "light_color must be"),
    ("light colour two numbers", "/set_params", {"light_color": [1.0, 2.0]}, "light_color needs three"),
    ("light colour NaN", "/set_params", {"light_color": [NAN, 0.0, 0.0]}, "light_color must be a finite"),
    ("light colour 20", "/set_params", {"light_color": [20.0, 0.0, 0.0]}, "in [0, 10]"),
    ("ambient negative", "/set_params", {"ambient": -1.0}, "ambient must be"),
    ("ambient 2", "/set_params", {"ambient": 2.0}, "ambient must be"),
    ("unknown light mode", "/set_params", {"light_mode": "sideways"}, "light_mode must be one of"),
    ("unknown shading mode", "/set_params", {"shading": "toon"}, "shading must be one of"),
    ("learning rate 0", "/set_params", {"learning_rate": 0.0}, "learning_rate must be"),
    ("learning rate 10", "/set_params", {"learning_rate": 10.0}, "learning_rate must be"),
    ("seed negative", "/set_params", {"seed": -1}, "seed must be an integer"),
    ("seed 2^64", "/set_params", {"seed": 2**64}, "seed must be an integer"),
    ("seed 1.5", "/set_params", {"seed": 1.5}, "seed must be an integer"),
    ("training share 0", "/set_params", {"train_util": 0.0}, "train_util must be a finite number in [0.05, 1]"),
    ("training share NaN", "/set_params", {"train_util": float("nan")}, "train_util must be a finite number"),
    ("steps 0", "/set_params", {"steps": 0}, "steps must be an integer"),
    ("steps negative", "/set_params", {"steps": -3}, "steps must be an integer"),
    ("steps 2.5", "/set_params", {"steps": 2.5}, "steps must be an integer"),
    ("unknown export kind", "/export", {"kind": "pdf"}, "export must be one of"),
    ("unknown prior on start", "/start", {"prior": "nope"}, "unknown prior 'nope'"),
    ("unknown prior on reset", "/reset", {"prior": "dalle"}, "unknown prior 'dalle'"),
    ("10 kB shading mode", "/set_params", {"shading": "toon" * 2500}, "shading must be one of"),
    ("10 kB light mode", "/set_params", {"light_mode": "x" * 10_000}, "light_mode must be one of"),
    ("10,000-number light colour", "/set_params", {"light_color": [0.5] * 10_000}, "light_color needs three"),
    ("10 kB light colour", "/set_params", {"light_color": "#" + "f" * 10_000}, "light_color must be"),
    ("10 kB guidance", "/set_params", {"guidance_scale": "9" * 10_000}, "guidance_scale must be"),
    ("10 kB export kind", "/export", {"kind": "pdf" * 3000}, "export must be one of"),
    ("10 kB run name", "/export", {"kind": "snapshot", "run": "C" * 10_000}, "run must be one of"),
    ("export of run B without a fork", "/export", {"kind": "snapshot", "run": "B"}, "there is no run B"),
    ("10 kB prior", "/start", {"prior": "dalle" * 2000}, "unknown prior"),
    ("10 kB fork guidance", "/fork", {"guidance_scale": "9" * 10_000}, "guidance_scale must be"),
    ("non-Latin prompt", "/set_params", {"prompt": "красный куб 赤い立方体"}, None),
    ("guidance 0", "/set_params", {"guidance_scale": 0.0}, None),
]


def _bad_checkpoints(root: Path) -> dict[str, Path]:
    """Run folders whose checkpoint is truncated, foreign or a pickle, next to a good meta file."""
    from engine.checkpoint import save_checkpoint
    from engine.config import LiveParams
    from engine.priors import load_prior
    from engine.trainer import Trainer

    good = root / "good"
    cfg = tiny_config()
    save_checkpoint(Trainer(cfg, load_prior(cfg.prior)), good, LiveParams())
    dirs = {}
    for name, write in {"truncated": lambda p: p.write_bytes((good / "checkpoint.safetensors").read_bytes()[:300]),
                        "foreign": lambda p: p.write_bytes(b"GIF89a" + bytes(500)),
                        "pickle": lambda p: torch.save({"field.w": torch.zeros(3)}, p)}.items():
        d = root / name
        d.mkdir()
        (d / "checkpoint.json").write_text((good / "checkpoint.json").read_text())
        write(d / "checkpoint.safetensors")
        dirs[name] = d
    return {"good": good, **dirs}


def cli_cases(root: Path) -> list[tuple]:
    ck = _bad_checkpoints(root)
    out = str(root / "cli-out")
    run = ["run", "--prior", "oracle:cube", "--resolution", "16", "--quiet", "--out", out]
    return [
        ("CLI steps 0", "python -m engine run", [*run, "--steps", "0"], "--steps must be a positive"),
        ("CLI steps negative", "python -m engine run", [*run, "--steps", "-5"], "--steps must be a positive"),
        ("CLI empty prompt", "python -m engine run", [*run, "--prompt", ""], "prompt must be a non-empty"),
        ("CLI unknown prior", "python -m engine run", ["run", "--prior", "nope", "--out", out], "unknown prior"),
        ("CLI guidance NaN", "python -m engine run", [*run, "--guidance-scale", "nan"], "guidance_scale must"),
        ("CLI guidance 1e6", "python -m engine run", [*run, "--guidance-scale", "1e6"], "in [0, 200]"),
        ("CLI seed negative", "python -m engine run", [*run, "--seed", "-1"], "seed must be an integer"),
        ("CLI resume truncated checkpoint", "python -m engine run --resume",
         ["run", "--resume", str(ck["truncated"])], "not a readable safetensors file"),
        ("CLI resume foreign file", "python -m engine run --resume",
         ["run", "--resume", str(ck["foreign"])], "not a readable safetensors file"),
        ("CLI export from a pickle", "python -m engine export",
         ["export", "--run", str(ck["pickle"]), "--snapshot"], "not a readable safetensors file"),
        ("CLI export path escapes", "python -m engine export",
         ["export", "--run", str(ck["good"]), "--mesh", "../../escape.glb"], "without '..'"),
        ("CLI export missing run", "python -m engine export",
         ["export", "--run", str(root / "none"), "--snapshot"], "no run folder"),
        ("CLI eval missing run", "python -m engine eval", ["eval", "--run", str(root / "none")], "no run folder"),
    ], ck


def engine_cases(ck: dict[str, Path], root: Path) -> list[tuple]:
    return [
        ("export name with ..", "engine.export.safe_path", lambda: safe_path(root, "../x.glb"), "without '..'"),
        ("absolute export name", "engine.export.safe_path", lambda: safe_path(root, "/etc/passwd"), "relative"),
        ("pickle as checkpoint", "engine.checkpoint.read_checkpoint", lambda: read_checkpoint(ck["pickle"]),
         "not a readable safetensors file"),
        ("missing checkpoint folder", "engine.checkpoint.read_checkpoint",
         lambda: read_checkpoint(root / "none"), "no run folder"),
    ]


def call_api(panel, where: str, kw: dict):
    import gradio as gr

    fn = {"/set_params": panel.api_set_params, "/export": panel.api_export, "/start": panel.api_start,
          "/reset": panel.api_reset, "/fork": panel.api_fork}[where]
    try:
        fn(**kw)
    except gr.Error as err:
        return err.message
    return None


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from playground.panel import Panel
    from playground.session import Session

    s = Session(tiny_config("oracle:cube"), tiny_live(), out_root=tmp_path_factory.mktemp("out"))
    s.start()
    wait_for(lambda: s.step >= 1, what="the first step")
    s.set_params(**GOOD)
    wait_for(lambda: s.status()["guidance_scale"] == GOOD["guidance_scale"], what="the good values")
    yield s, Panel(s)
    s.stop()


@pytest.mark.parametrize("case,where,kw,words", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_gets_a_message_and_the_run_goes_on(running, case, where, kw, words):
    session, panel = running
    before = session.step
    message = call_api(panel, where, kw)
    if words is None:
        assert message is None, f"{case}: refused ({message})"
        session.set_params(**{k: v for k, v in GOOD.items() if k in kw}, prompt="a red cube")
    else:
        assert message and words in message, f"{case}: {message!r}"
        for value in kw.values():  # a bad value is quoted by at most ~80 characters, never echoed whole
            text = value if isinstance(value, str) else repr(value)
            assert len(text) < 100 or text[:100] not in message, f"{case}: the value is echoed whole"
        assert len(message) < 400, f"{case}: {len(message)} characters"
    session.wait_idle_queue()
    wait_for(lambda: session.step > before, what="steps after the bad input")
    st = session.status()
    assert st["state"] == "running" and st["error"] is None, st["message"]
    assert {k: st[k] for k in GOOD} == GOOD


def test_quoted_values_are_cut_to_about_80_characters():
    from engine.config import quoted

    assert quoted("toon") == "'toon'" and quoted(3.5) == "3.5"
    long = quoted("x" * 10_000)
    assert len(long) < 110 and long.startswith("'xxx") and "10002 characters" in long
    assert "10000 items" in quoted([1.0] * 10_000) and len(quoted([1.0] * 10_000)) < 110


def test_a_refused_value_logs_one_line_not_a_traceback(running, caplog):
    import logging

    session, panel = running
    with caplog.at_level(logging.INFO):
        assert call_api(panel, "/set_params", {"shading": "toon" * 2500})
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage()[:200] for r in lines]
    text = lines[0].getMessage()
    assert text.startswith("refused /set_params: shading must be one of") and "\n" not in text and len(text) < 300


def test_every_message_that_lists_the_oracles_solids_lists_the_same_ones(running):
    """engine.world.SHAPES is the one list: the prior help of errors, the pane's prior menu, an unknown solid's
    error, the README's table and a failed load all name exactly those solids."""
    import re

    from engine import world
    from engine.priors import PRIOR_HELP, check_prior_spec
    from playground.controls import PRIORS

    def named(text: str) -> set[str]:
        return {w for w in re.findall(r"[a-z]+", text) if w in world.SHAPES}

    solids = set(world.SHAPES)
    assert len(solids) == 8
    with pytest.raises(ValueError) as err:
        check_prior_spec("nope")
    assert named(str(err.value)) == solids and named(PRIOR_HELP) == solids
    with pytest.raises(ValueError) as err:
        world.solid_sdf("pyramid", torch.zeros(1, 3))
    assert named(str(err.value)) == solids
    assert {p.split(":")[1] for p in PRIORS if p.startswith("oracle:")} == solids
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `oracle:<solid>`"))
    assert named(row) == solids
    session, _ = running
    session.reset("oracle:pyramid")  # fails to load: the run goes on and the warning names the solids
    session.wait_idle_queue(30)
    assert named(session.status()["warnings"][-1]) == solids


def test_a_prior_that_fails_to_load_keeps_the_run(running):
    session, panel = running
    trainer, before = session.a.trainer, session.step
    session.reset("sd:/nonexistent/model-folder")
    session.wait_idle_queue(60)
    wait_for(lambda: session.step > before + 1, what="steps after the failed reset")
    st = session.status()
    assert session.a.trainer is trainer and st["state"] == "running" and st["prior"] == "oracle:cube"
    assert any("reset failed" in w and "not available" in w for w in st["warnings"]), st


def test_cli_and_engine_bad_input_give_one_clear_error(tmp_path, capsys):
    cases, ck = cli_cases(tmp_path)
    for case, _where, argv, words in cases:
        capsys.readouterr()
        assert cli(argv) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, f"{case}: {err!r}"
    assert not (tmp_path.parent / "escape.glb").exists()
    for case, _where, fn, words in engine_cases(ck, tmp_path):
        with pytest.raises((ValueError, CheckpointError)) as err:
            fn()
        assert words in str(err.value), f"{case}: {err.value}"


if __name__ == "__main__":  # print the table of docs/troubleshooting.md
    import contextlib
    import io
    import tempfile

    from playground.panel import Panel
    from playground.session import Session

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        s = Session(tiny_config("oracle:cube"), tiny_live(), out_root=tmp)
        s.start()
        wait_for(lambda: s.step >= 1)
        for case, where, kw, _ in API_CASES:
            msg = call_api(Panel(s), where, kw)
            rows.append((case, f"API `{where}`", msg or "accepted", "run goes on"))
            s.set_params(**GOOD, prompt="a red cube")
        s.stop()
        cases, ck = cli_cases(Path(tmp))
        for case, where, argv, _ in cases:
            buf = io.StringIO()
            with contextlib.redirect_stderr(buf):
                rc = cli(argv)
            rows.append((case, f"`{where}`", buf.getvalue().strip().splitlines()[-1], f"exit {rc}"))
        for case, where, fn, _ in engine_cases(ck, Path(tmp)):
            try:
                fn()
            except (ValueError, CheckpointError) as err:
                rows.append((case, f"`{where}`", str(err), "refused"))
    print("| # | case | where | message | outcome |\n|---|---|---|---|---|")
    for i, (case, where, msg, outcome) in enumerate(rows, 1):
        msg = msg.replace("|", "\\|").replace(tmp, "<tmp>")
        print(f"| {i} | {case} | {where} | {msg[:160]} | {outcome} |")
