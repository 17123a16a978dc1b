"""The run table: one definition of clipped, clip rate, healthy steps, the clipper and explosion onset.

Standard library only (no torch): these tests run where torch is not installed.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from gradguard import runtable as T
from gradguard.runtable import RunTable, clip_config, clip_rate, clipped, post_clip_norm

NAN, INF = math.nan, math.inf


# ----------------------------------------------------------------------------- one record
@pytest.mark.parametrize(
    ("rec", "expected"),
    [
        ({"clip_coef": 0.5}, True),
        ({"clip_coef": 1.0}, False),
        ({"clip_coef": 0.0}, True),  # norm:0
        ({"clip_coef": NAN, "clip_fraction": 0.25}, True),  # AGC / value / per-layer clipping
        ({"clip_coef": NAN, "clip_fraction": 0.0}, False),
        ({"clip_coef": 1.0, "clip_fraction": 0.5}, True),  # a spike threshold and a unit clipper
        ({"grad_norm": 2.0, "threshold": 1.0}, True),  # another tool's log: no coefficient
        ({"grad_norm": 1.0, "threshold": 1.0}, False),
        ({"grad_norm": 2.0, "threshold": INF}, False),
        ({"grad_norm": 2.0}, False),
        ({"clip_coef": 0.5, "skipped": True}, False),  # a skipped step reached no weights
        ({"clip_coef": "nan"}, False),  # not a number
    ],
)
def test_clipped_per_step(rec: dict, expected: bool) -> None:
    assert clipped(rec) is expected


def test_the_clip_rate_leaves_skipped_steps_out_of_the_denominator() -> None:
    records = [
        {"step": 0, "clip_coef": 0.5},
        {"step": 1, "clip_coef": 1.0},
        {"step": 2, "clip_coef": 0.5, "skipped": True},
        {"step": 3, "clip_fraction": 1.0},
    ]
    assert clip_rate(records) == pytest.approx(2 / 3)
    assert RunTable.from_records(records).clip_rate == pytest.approx(2 / 3)
    assert math.isnan(clip_rate([{"step": 0, "skipped": True}]))
    assert math.isnan(clip_rate([]))


def test_post_clip_norm() -> None:
    assert post_clip_norm({"grad_norm": 4.0, "clip_coef": 0.25}) == 1.0
    assert post_clip_norm({"grad_norm": 4.0, "clip_coef": NAN}) == 4.0
    assert math.isnan(post_clip_norm({}))


# ----------------------------------------------------------------------------- the table
def test_columns_and_derived_series() -> None:
    table = RunTable.from_records(
        [
            {
                "step": 0,
                "loss": 1.0,
                "grad_norm": 1.0,
                "clip_coef": 1.0,
                "lr": 0.1,
                "layers": {"a": {"grad_norm": 0.5}},
            },
            {"step": 1, "loss": NAN, "grad_norm": NAN, "nonfinite": True, "skipped": True},
            {
                "step": 2,
                "loss": 1.0,
                "grad_norm": INF,
                "nonfinite": True,
                "amp_overflow": True,
                "skipped": True,
            },
            {"step": 3, "loss": 0.5, "grad_norm": 2.0, "clip_coef": 0.5, "spike": True},
            {"step": True, "loss": 9.0},  # not a step
            {"loss": 9.0},
        ]
    )
    assert table.steps == [0, 1, 2, 3] and len(table) == 4
    assert table.layers == ["a"]
    assert table.skipped == [False, True, True, False]
    assert table.bad == [False, True, False, False]  # an AMP overflow is the scaler's business
    assert table.healthy == [True, False, False, True]
    assert table.clipped == [False, False, False, True]
    assert table.spike == [False, False, False, True]
    assert table.clip_rate == 0.5
    assert table.lr[0] == 0.1 and math.isnan(table.lr[1])
    assert table.layer("a", "grad_norm")[0] == 0.5 and math.isnan(table.layer("a", "grad_norm")[3])
    assert table.has_layer_key("grad_norm") and not table.has_layer_key("weight_norm")
    assert table.index_of(2) == 2 and table.index_of(99) == 4


# ----------------------------------------------------------------------------- the clipper
def test_the_clipper_from_meta_json_as_a_dict_or_as_an_old_repr() -> None:
    new = clip_config(
        {"config": {"clip": {"kind": "autoclip", "percentile": 10.0}, "clip_repr": "AutoClip(...)"}}
    )
    assert (new.kind, new.label, new.params, new.family) == (
        "autoclip",
        "AutoClip(...)",
        {"percentile": 10.0},
        "adaptive",
    )
    assert clip_config({"config": {"clip": {"kind": "norm", "max_norm": 0.0}}}).label == "norm(max_norm=0.0)"
    old = clip_config({"config": {"clip": "Norm(max_norm=5.0)"}})
    assert (old.kind, old.label, old.params, old.family) == ("norm", "Norm(max_norm=5.0)", {}, "fixed")
    assert clip_config({"config": {"clip": "PerLayer(max_norm=1.0)"}}).family == "other"
    assert clip_config({"config": {"clip": {"kind": "layer", "max_norm": 1.0}}}).family == "other"
    for said_none in ({"config": {"clip": None}}, {"config": {"clip": "None"}}):
        assert (clip_config(said_none).kind, clip_config(said_none).family) == ("none", "none")
    assert clip_config({}).kind == "" and clip_config({}).label is None  # the run does not say


# ----------------------------------------------------------------------------- explosion onset
def test_a_climb_starts_where_the_norm_triples_over_the_median_before_it_and_stays() -> None:
    flat = [1.0] * 20
    assert T.climb_onset(flat, ends_in_trouble=True) is None
    climb = flat + [4.0 * 2**k for k in range(10)]
    assert T.climb_onset(climb, ends_in_trouble=False) == 20
    spike = [*flat, 50.0, *flat]  # a lone spike is not a climb
    assert T.climb_onset(spike, ends_in_trouble=True) is None
    small = [*flat, *[4.0] * 10]  # 4× and no trouble: not an explosion
    assert T.climb_onset(small, ends_in_trouble=False) is None
    assert T.climb_onset(small, ends_in_trouble=True) == 20
    assert T.climb_onset([1.0, 100.0, 100.0, 100.0], ends_in_trouble=True) is None  # no history before it
    # ... unless the jump goes on climbing: a VAE at a far too high rate, from step 1 (was read at 4)
    vae = [198.1, 80875.0, 230249.5, 99850.1, 429994.3, 1845108.9, 7915994.5, 3.4e7]
    assert T.climb_onset(vae, ends_in_trouble=False) == T.climb_onset(vae, ends_in_trouble=True) == 1
    zero_init = [0.01, *[1.0 + 0.1 * (k % 3) for k in range(30)]]  # a jump after step 0 that holds
    assert T.climb_onset(zero_init, ends_in_trouble=True) is None
    # norms scattering over two decades at a loss floor (a linear head on separable data): four high ones
    # in a row, then the scatter as before, one of them 19x the median: no climb in a run that stayed finite
    scatter = [0.007 * 10 ** (0.9 * math.sin(2.7 * k)) for k in range(120)]
    floor = [*scatter, 0.03, 0.05, 0.04, 0.13, *scatter]
    assert T.climb_onset(floor, ends_in_trouble=False) is None
    assert T.climb_onset(floor, ends_in_trouble=True) is not None  # (it went wrong after: counted)


def test_the_first_layer_to_grow() -> None:
    layers = {
        "a": [1.0, 1.0, 1.0, 5.0, 50.0],  # 10× at row 4
        "b": [1.0, 1.0, 1.0, 20.0, 30.0],  # 10× at row 3: first
        "c": [1.0, 1.0, 1.0, NAN, NAN],  # not measured (not a bad step)
    }
    grew = T.first_layer_to_grow(layers, range(0, 3), [False] * 5)
    assert grew == T.LayerGrowth("b", 3, 20.0)
    tie = T.first_layer_to_grow(
        {"a": [1.0, 1.0, 1.0, 20.0], "b": [1.0, 1.0, 1.0, 30.0]}, range(3), [False] * 4
    )
    assert tie is not None and tie.name == "b"  # same step: the larger rise
    bad = T.first_layer_to_grow({"a": [1.0, 1.0, 1.0, NAN]}, range(3), [False, False, False, True])
    assert bad is not None and bad.index == 3 and bad.ratio == INF  # non-finite on a bad step: grown


def test_the_rnn_demo_onset_is_the_climb_and_the_layer_that_led_it() -> None:
    """The rnn demo's unclipped run (seed 0), steps 0-10 before its first non-finite step 11.

    locate used to say step 4 / embed (the embedding's norm fell to 0 after a blip at step 2),
    diagnose step 3 / lstm; both now read this one definition. The climb starts at step 1 (9.92 →
    210, 21×, and on to 1e20): with three norms required before a climb it read step 3, and the
    "healthy" baseline held 210 and 3.65e5.
    """
    norms = [9.92, 209.7, 3.65e5, 3.46e6, 2.07e8, 2.77e10, 3.25e12, 1.09e15, 2.39e16, 2.71e18, 1.55e20]
    layers = {
        "embed": [0.215, 2.61, 148.6, 3.30, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        "lstm": [4.00, 181.8, 3.64e5, 3.29e6, 1.92e8, 2.76e10, 4.20e11, 1.09e15, 1.63e16, 2.67e18, INF],
        "decoder": [9.07, 104.5, 2.40e4, 1.05e6, 7.95e7, 2.29e9, 3.22e12, 8.32e13, 1.74e16, 5.06e17, INF],
    }
    onset = T.explosion_onset(list(range(11)), norms, layers)
    assert onset.step == 1 and onset.healthy == range(0, 1)
    assert onset.layer is not None and (onset.layer.name, onset.layer.index) == ("lstm", 1)


def test_the_readers_modules_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import gradguard.runtable, gradguard.optable, gradguard.diagnose\n"
        "import gradguard.diagnose.rules\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_table_reads_the_records_fields_by_their_names() -> None:
    """The columns are fields of the step record (gradguard.record owns their names)."""
    from gradguard import record

    assert set(T._FLOATS) <= set(record.SCALARS) | {record.LR}
    assert {"skipped", "spike", "amp_overflow", "nonfinite"} <= record.FLAGS


def test_the_global_step_column_names_each_records_process_wide_step() -> None:
    """Several optimizers under ``gradguard run``: every record carries ``global_step``; a reader asks
    the table for the global step of any step, not only of one that has an event."""
    records = [{"step": s, "grad_norm": 1.0, "global_step": 2 * s + 1} for s in range(4)]
    records += [{"step": 4, "grad_norm": 1.0}, {"step": 5, "grad_norm": 1.0, "global_step": True}]
    table = RunTable.from_records(records)
    assert list(table.global_steps) == [1, 3, 5, 7, -1, -1]
    assert [table.global_step(s) for s in (0, 3, 4, 5, 99)] == [1, 7, None, None, None]
    builder = T.TableBuilder()
    for rec in records:
        builder.append(rec)
    builder.drop_from(2)  # a rewind drops the rows and their global steps
    assert list(builder.table().global_steps) == [1, 3] and builder.table().global_step(2) is None
