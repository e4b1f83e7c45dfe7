"""What the views of a prompt look like to the classifier (lab/view_blend.py)."""

from engine.evaluate import world_render_fn
from lab.view_blend import BLENDS, cases, geometry_by_view


def test_geometry_by_view_finds_the_views_where_a_perfect_mug_hides_its_handle():
    """The mug's handle points to +y (azimuth 90): from the other side it hides behind the body."""
    res = geometry_by_view(world_render_fn("mug", "red"), "mug", n_views=192, seed=1000)
    ring = ("front", "side", "back", "overhead")
    assert sum(res[v]["n"] for v in ring) == res["all"]["n"] == 192
    assert res["side (azimuth > 0)"]["n"] + res["side (azimuth < 0)"]["n"] == res["side"]["n"]
    assert sum(res[v]["right"] for v in ring) == res["all"]["right"]
    hidden, front = res["side (azimuth < 0)"]["share"], res["front"]["share"]
    assert front >= 0.85 and res["side (azimuth > 0)"]["share"] >= 0.85 and hidden <= front - 0.15


def test_cases_blend_the_view_encodings(tiny_embedded_model):
    out = cases(tiny_embedded_model, "a red mug")
    assert list(out) == ["plain", "front", "side", "back", *BLENDS]
    states, pooled = out["front/side 50/50"]
    assert states.shape == out["front"][0].shape and pooled.shape == out["front"][1].shape
    assert (pooled - 0.5 * (out["front"][1] + out["side"][1])).abs().max() < 1e-6
