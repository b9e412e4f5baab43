"""A YouTube-like synthetic impression log with known ground truth.

Each request is a user on a device/surface at an hour, shown a slate of candidates ordered by a
noisy logging policy. Labels come from latent factors:

* engagement affinity ``a = <u, v> + item quality``; satisfaction affinity
  ``s = rho * a + sqrt(1 - rho^2) * <u', v'>`` so ``correlation`` (rho) sets how far the two agree;
* click follows the examination hypothesis, ``P(click) = examine(position) * sigmoid(a + b)`` with
  ``examine(p) = (1 + p) ** -position_bias``: position changes clicks independently of relevance;
* ``true_relevance = sigmoid(a + b)`` (click probability if examined) and ``true_satisfaction`` are
  written next to the labels for evaluating debiasing;
* the logging policy orders a slate by relevance plus noise, plus ``policy_promotion`` for items of
  promoted categories (every third category): a business rule that puts items on top whatever their
  relevance, the confounder that makes position bias hurt a ranking learned from clicks.

Example:
    >>> from features.synthetic import SynthConfig, generate_day
    >>> df = generate_day(SynthConfig(users=50, items=80, requests_per_day=10, slate_size=5), day=0)
    >>> df.height
    50
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.synthetic_config import SynthConfig

DEVICES = ("android", "ios", "web", "tv")
SURFACES = ("home", "watch_next", "search")


@dataclass(frozen=True)
class _World:
    """Latent state shared by all days: factors of users and items, item metadata."""

    user_eng: np.ndarray  # (U, K)
    user_sat: np.ndarray  # (U, K)
    user_device: np.ndarray  # (U,) preferred device index
    item_eng: np.ndarray  # (I, K)
    item_sat: np.ndarray  # (I, K)
    item_quality: np.ndarray  # (I,)
    item_creator: np.ndarray  # (I,)
    item_category: np.ndarray  # (I,)
    item_tags: pl.Series  # (I,) List(String)
    item_duration: np.ndarray  # (I,) seconds
    item_upload_day: np.ndarray  # (I,) day offset, may be negative


def _world(cfg: SynthConfig) -> _World:
    rng = np.random.default_rng([cfg.seed, 0])
    k = cfg.factors
    scale = 1.0 / math.sqrt(k)
    cat_eng = rng.normal(0, 1.0, (cfg.categories, k))
    cat_sat = rng.normal(0, 1.0, (cfg.categories, k))
    item_category = rng.integers(0, cfg.categories, cfg.items)
    item_creator = rng.integers(0, cfg.creators, cfg.items)
    creator_quality = rng.normal(0, 0.5, cfg.creators)
    item_eng = (cat_eng[item_category] + rng.normal(0, 0.7, (cfg.items, k))) * scale
    item_sat = (cat_sat[item_category] + rng.normal(0, 0.7, (cfg.items, k))) * scale
    n_tags = rng.integers(1, 5, cfg.items)
    # Tags are drawn from a pool tied to the category, so they carry signal about the item.
    tag_base = item_category * (cfg.tags // cfg.categories)
    tag_ids = (tag_base[:, None] + rng.integers(0, max(cfg.tags // cfg.categories, 1) + 3, (cfg.items, 4)))
    item_tags = pl.Series(
        "tags",
        [[f"tag_{t % cfg.tags}" for t in dict.fromkeys(row[:n])] for row, n in zip(tag_ids, n_tags, strict=True)],
        dtype=pl.List(pl.String),
    )
    return _World(
        user_eng=rng.normal(0, 1.0, (cfg.users, k)) * 1.5,
        user_sat=rng.normal(0, 1.0, (cfg.users, k)) * 1.5,
        user_device=rng.integers(0, len(DEVICES), cfg.users),
        item_eng=item_eng,
        item_sat=item_sat,
        item_quality=creator_quality[item_creator] + rng.normal(0, 0.3, cfg.items),
        item_creator=item_creator,
        item_category=item_category,
        item_tags=item_tags,
        item_duration=np.exp(rng.normal(5.0, 0.8, cfg.items)).clip(10, 3600),
        item_upload_day=-rng.exponential(60, cfg.items) + rng.integers(0, cfg.days, cfg.items) * 0.5,
    )


def _sample_slates(rng: np.random.Generator, n: int, size: int, items: int) -> np.ndarray:
    """(n, size) item indices, distinct within each row, without an (n, items) matrix."""
    slates = rng.integers(0, items, (n, size))
    while True:
        order = np.sort(slates, axis=1)
        dup_rows = np.nonzero((order[:, 1:] == order[:, :-1]).any(axis=1))[0]
        if dup_rows.size == 0:
            return slates
        slates[dup_rows] = rng.integers(0, items, (dup_rows.size, size))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


def generate_day(cfg: SynthConfig, day: int, world: _World | None = None) -> pl.DataFrame:
    """All impressions of one day as a DataFrame (one row per candidate shown)."""
    w = world if world is not None else _world(cfg)
    rng = np.random.default_rng([cfg.seed, 1, day])
    r, s = cfg.requests_per_day, cfg.slate_size
    users = rng.integers(0, cfg.users, r)
    # Most requests come from the user's usual device.
    device = np.where(rng.random(r) < 0.8, w.user_device[users], rng.integers(0, len(DEVICES), r))
    surface = rng.choice(len(SURFACES), r, p=[0.5, 0.35, 0.15])
    seconds = np.sort(rng.integers(0, 86_400, r))
    hour = seconds // 3600
    items = _sample_slates(rng, r, s, cfg.items)  # (R, S)

    u_e, u_s = w.user_eng[users][:, None, :], w.user_sat[users][:, None, :]  # (R, 1, K)
    a = (u_e * w.item_eng[items]).sum(-1) + w.item_quality[items]  # (R, S) engagement affinity
    own_sat = (u_s * w.item_sat[items]).sum(-1)
    rho = cfg.correlation
    sat = rho * a + math.sqrt(1.0 - rho * rho) * own_sat  # (R, S) satisfaction affinity
    # Context shifts engagement: evening and watch-next sessions click more.
    ctx = 0.3 * np.cos((hour - 20) / 24 * 2 * math.pi)[:, None] + np.where(surface == 1, 0.3, 0.0)[:, None]
    rel_logit = a - 1.0 + ctx
    true_relevance = _sigmoid(rel_logit)

    # Logging policy: a noisy view of relevance (plus any promotion) decides the display order.
    promoted = (w.item_category[items] % 3 == 0) * cfg.policy_promotion  # (R, S)
    policy = rel_logit + promoted + rng.normal(0, cfg.policy_noise, (r, s))
    order = np.argsort(-policy, axis=1)
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(s)[None, :].repeat(r, 0), axis=1)

    examine = (1.0 + position) ** -cfg.position_bias
    click = rng.random((r, s)) < examine * true_relevance
    true_satisfaction = _sigmoid(sat - 1.5)
    completion = _sigmoid(0.8 * a + 0.5 * sat + rng.normal(0, 0.5, (r, s)))
    duration = w.item_duration[items]
    watch = np.where(click, duration * completion, 0.0)
    like = click & (rng.random((r, s)) < true_satisfaction)
    dismiss = rng.random((r, s)) < _sigmoid(-sat - 3.5)

    base = datetime.combine(cfg.start, datetime.min.time()) + timedelta(days=day)
    ts = np.datetime64(base, "us") + (seconds * 1_000_000).astype("timedelta64[us]")
    flat_items = items.ravel()
    return pl.DataFrame(
        {
            "request_id": np.repeat(np.arange(r, dtype=np.int64) + (day * 10_000_000 + 1), s),
            "user_id": np.repeat(users.astype(np.int64), s),
            "ts": np.repeat(ts, s),
            "device": np.repeat(np.asarray(DEVICES)[device], s),
            "surface": np.repeat(np.asarray(SURFACES)[surface], s),
            "hour": np.repeat(hour.astype(np.int8), s),
            "item_id": flat_items.astype(np.int64),
            "creator_id": w.item_creator[flat_items].astype(np.int64),
            "category": np.char.add("cat_", w.item_category[flat_items].astype(str)),
            "tags": w.item_tags.gather(flat_items),
            "duration_s": duration.ravel().astype(np.float32),
            "item_age_days": np.maximum(day - w.item_upload_day[flat_items], 0.0).astype(np.float32),
            "position": position.ravel().astype(np.int16),
            "click": click.ravel().astype(np.int8),
            "watch_time_s": watch.ravel().astype(np.float32),
            "like": like.ravel().astype(np.int8),
            "dismiss": dismiss.ravel().astype(np.int8),
            "true_relevance": true_relevance.ravel().astype(np.float32),
            "true_satisfaction": true_satisfaction.ravel().astype(np.float32),
        }
    )


def write_log(cfg: SynthConfig, out: str | Path) -> list[Path]:
    """Write ``out/date=YYYY-MM-DD/part-0.parquet`` for each day; returns the files written."""
    out = Path(out)
    world = _world(cfg)
    paths = []
    for day in range(cfg.days):
        d = cfg.start + timedelta(days=day)
        part = out / f"date={d.isoformat()}"
        part.mkdir(parents=True, exist_ok=True)
        path = part / "part-0.parquet"
        generate_day(cfg, day, world).write_parquet(path)
        paths.append(path)
    return paths


def config_with(**overrides: object) -> SynthConfig:
    """A config with the given fields replaced (``None`` keeps the default)."""
    # fields of several types, named at run time (a pipeline config's YAML): replace() checks the
    # names, __post_init__ the values
    changes: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(SynthConfig(), **changes)
