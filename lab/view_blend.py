"""What the embedded prior draws for each view of a prompt, and for the blends of two views that SDS's
view-dependent prompting feeds it (issue 3's ablation: why "+view-dependent prompts" does not raise geometry).

For each prompt, samples the prior n times from the same seed for: the plain prompt; ", front/side/back view";
and the encodings blended as `engine.sds.view_weights` blends them between cameras (front/side 50/50 at
azimuth 45, side/back 50/50 at 135, front/side 75/25 at 22.5). The independent classifier says what shape each
sample is. Prints one line per case and, with --json, writes them all.

--world reads the world's own solids instead (`geometry_by_view`: textureless renders from --views random
evaluation cameras, the classifier's geometry R-Precision per view label): which views of a perfect object the
metric itself finds ambiguous.

    python -m lab.view_blend --prompts 'a red cube' 'a red mug' 'an orange mug' 'a red house'
    python -m lab.view_blend --world --prompts 'a red cube' 'a red mug' 'a red house' 'a pink snowman'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine.cameras import make_light, sample_cameras
from engine.config import LiveParams
from engine.evaluate import (
    EVAL_CAMERAS,
    SHAPE_NAMES,
    Classifier,
    RenderFn,
    load_classifier,
    parse_prompt,
    votes,
    world_render_fn,
)
from engine.priors.embedded import EmbeddedPrior, sample
from engine.sds import VIEWS, view_weights

BLENDS = {"front/side 50/50": {"front": 0.5, "side": 0.5}, "side/back 50/50": {"side": 0.5, "back": 0.5},
          "front/side 75/25": {"front": 0.75, "side": 0.25}}


@torch.no_grad()
def geometry_by_view(render_fn: RenderFn, shape: str, n_views: int = 512, seed: int = 1000,
                     classifier: Classifier | None = None) -> dict[str, dict]:
    """Geometry R-Precision split by the view label of each camera (`engine.sds.view_weights`' argmax), the
    side views also by which side (azimuth > 0 or < 0). Same cameras and shading as `evaluate`.

    On the world's own solids (`world_render_fn`) this shows which views of a shape are ambiguous even when
    the shape is perfect, e.g. a mug seen from behind its handle. Returns {view: {"right", "n", "share"}}."""
    clf = classifier or load_classifier()
    cams = sample_cameras(EVAL_CAMERAS, n_views, torch.Generator().manual_seed(seed))
    light = make_light(cams, LiveParams(light_mode="camera"), EVAL_CAMERAS, None)
    plain, _ = render_fn(cams, light, "textureless")
    right = clf(plain.float().cpu())[1].argmax(1) == SHAPE_NAMES.index(shape)
    label = view_weights(cams.azimuth, cams.elevation).argmax(-1).cpu()
    az = torch.remainder(cams.azimuth.cpu() + 180.0, 360.0) - 180.0
    groups = {v: label == i for i, v in enumerate(VIEWS)}
    groups["side (azimuth > 0)"] = groups["side"] & (az > 0)
    groups["side (azimuth < 0)"] = groups["side"] & (az < 0)
    groups["all"] = torch.ones_like(right)
    out = {}
    for name, m in groups.items():
        k, n = int((right & m).sum()), int(m.sum())
        out[name] = {"right": k, "n": n, "share": round(k / n, 3) if n else None}
    return out


@torch.no_grad()
def cases(model, prompt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Text encodings (states [1, L, D], pooled [1, D]) of the plain prompt, its three ring views and BLENDS."""
    out = {"plain": model.encode([prompt])}
    for v in ("front", "side", "back"):
        out[v] = model.encode([f"{prompt}, {v} view"])
    for name, mix in BLENDS.items():
        parts = [(w, out[v]) for v, w in mix.items()]
        out[name] = tuple(sum(w * enc[i] for w, enc in parts) for i in range(2))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", nargs="+", default=["a red cube", "a red mug", "an orange mug", "a red house"])
    ap.add_argument("--weights", default=None, help="embedded prior weights (default: the shipped ones)")
    ap.add_argument("--n", type=int, default=24, help="samples per case")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--world", action="store_true", help="the world's own solids per view, not the prior's samples")
    ap.add_argument("--views", type=int, default=512, help="--world: random evaluation cameras")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.world:
        return world_views(args)
    model = EmbeddedPrior.load(args.weights).model
    clf = load_classifier()
    results, t0 = [], time.perf_counter()
    for prompt in args.prompts:
        _, shape = parse_prompt(prompt)
        for name, (states, pooled) in cases(model, prompt).items():
            text = (states.expand(args.n, -1, -1), pooled.expand(args.n, -1))
            with torch.no_grad():
                imgs = sample(model, [prompt] * args.n, args.cfg, args.steps, torch.Generator().manual_seed(args.seed),
                              text=text)
                v = votes(clf(imgs)[1], SHAPE_NAMES)
            row = {"prompt": prompt, "case": name, "right": v.get(shape, 0), "n": args.n,
                   "shape_votes": dict(sorted(v.items(), key=lambda kv: -kv[1]))}
            results.append(row)
            print(f"{prompt:16s} {name:18s} {row['right']:3d} / {args.n}  {row['shape_votes']}", flush=True)
    print(f"{time.perf_counter() - t0:.0f} s")
    _write_json(args, results)


def _write_json(args, rows: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


def world_views(args) -> None:
    """--world: geometry R-Precision of each prompt's perfect solid, per view label."""
    clf, results = load_classifier(), []
    for prompt in args.prompts:
        color, shape = parse_prompt(prompt)
        res = geometry_by_view(world_render_fn(shape, color or "white"), shape, args.views, 1000 + args.seed, clf)
        results.append({"prompt": prompt, "by_view": res})
        print(f"{prompt:16s} " + "  ".join(f"{v}: {r['right']}/{r['n']}" for v, r in res.items()), flush=True)
    _write_json(args, results)


if __name__ == "__main__":
    main()
