"""What the pane says in words: the status line, run A against run B, the prior's vocabulary. Functions of the
status JSON (`Session.status`); each message is shown once, whole."""

from __future__ import annotations

import html

SCORE_WORDS = (("color_r_precision", "colour"), ("geometry_r_precision", "geometry"), ("shape_score", "silhouette"))
ICONS = {"running": "▶", "paused": "⏸", "done": "✓", "error": "⚠", "idle": "○"}
# the pane's export buttons (playground/exports.py's kinds; the textured mesh has its own box, meshpane.py)
EXPORT_LABELS = {"checkpoint": "Checkpoint", "snapshot": "Snapshot (PNG + checkpoint)",
                 "video": "Orbit video (mp4 + GIF)", "mesh": "Mesh (glb, vertex colours)"}


def esc(text: str) -> str:
    return html.escape(text, quote=False)


def score_text(score: dict | None) -> str:
    if not score:
        return "score –"
    parts = [f"{word} {score[k]:.2f}" for k, word in SCORE_WORDS if score.get(k) is not None]
    return f"score {' · '.join(parts)} (step {score['step']})"


def loss_text(loss: float | None) -> str:
    return "–" if loss is None else f"{loss:.3g}"


def field_text(run: dict) -> str:
    """A run's field in words: "NeRF (grid)", "splats (1024)"."""
    if run.get("backbone") == "gaussians":
        return f"splats ({run.get('gaussians')})"
    return f"NeRF ({run.get('backbone')})" if run.get("backbone") else "–"


def fork_markdown(st: dict) -> str:
    """Run A against run B: field, step, smoothed loss, score, and what differs (empty while no fork is open)."""
    b = st.get("fork")
    if not b:
        return ""
    lines = ["| run | step | loss (smoothed) | live score |", "|---|---|---|---|"]
    for r in st["runs"]:
        lines.append(f"| **{r['name']}** {field_text(r)} | {r['step']} | {loss_text(r.get('loss_smoothed'))} | "
                     f"{score_text(r['score']).removeprefix('score ')} |")
    diff = "; ".join(f"{k}: A {esc(str(v[0]))} → B {esc(str(v[1]))}" for k, v in b["differs"].items())
    return "\n".join(lines) + f"\n\nB differs in: {diff or 'nothing (yet)'}"


def prior_text(st: dict) -> str:
    """The prior in use, and a switch that failed (the dropdown goes back to the prior in use)."""
    failed = st.get("prior_failed")
    out = f"prior `{esc(st['prior'])}`"
    return out + (f" (switch to `{esc(failed['prior'])}` failed)" if failed else "")


def notes(st: dict) -> list[str]:
    """What the status says below its first line, each once: the error or the message, then what failed
    (a prior switch, run B) that the next step's message would hide. Run A's unknown prompt words are the
    vocabulary's to show, not these."""
    words = set((st.get("runs") or [{}])[0].get("warnings", []))
    out: list[str] = []
    for line in (st["error"] or st["message"], *st["warnings"]):
        if line and line != "training" and line not in words and line not in out:  # "running" says "training"
            out.append(line)
    return out


def status_markdown(st: dict) -> str:
    loss = loss_text(st.get("loss_smoothed"))
    lines = [f"**{ICONS.get(st['state'], '')} {st['state']}** · step **{st['step']}** / {st['steps']} · "
             f"**{st['its_per_s']:.2f}** it/s · loss {loss} (smoothed) · {score_text(st.get('score'))} · "
             f"{prior_text(st)}"]
    if st.get("skipped_steps") or st.get("rollbacks"):
        lines[0] += f" · skipped {st.get('skipped_steps', 0)} non-finite steps, {st.get('rollbacks', 0)} rollbacks"
    lines += [("**Error:** " if n == st["error"] else "") + esc(n) for n in notes(st)]
    if st.get("settings_note"):
        lines += ["", esc(st["settings_note"])]
    return "\n\n".join(line for line in lines if line)


def short_warning(text: str) -> str:
    """An unknown-words warning without the word list the pane shows just below it."""
    head, sep, _ = text.partition("; it knows only:")
    return head + (" (not among the words below)" if sep else "")


def vocabulary_markdown(st: dict, vocab: list[str] | None) -> str:
    """The embedded prior's words, and the prompt words it does not know (run A's)."""
    parts = []
    warnings = (st.get("runs") or [{}])[0].get("warnings", [])
    if warnings:
        parts.append("⚠ " + esc("; ".join(short_warning(w) for w in warnings)))
    if vocab:
        parts.append("Words this prior knows: " + ", ".join(f"`{w}`" for w in vocab))
    return "\n\n".join(parts)
