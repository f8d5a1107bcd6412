"""The issue's goals (64k ids, dim 64, fp16, uniform ids), checked against this run's measurements."""
from __future__ import annotations

from bench.decode import GRPC, SAME_HOST
from bench.lookup import LMDB, NUMPY, RAM, RAM_SAME_HOST, REDIS
from bench.report import Goal, Section

GOAL_SIZE, GOAL_DTYPE = 65536, "float16"


def _lookup_rate(sections: list[Section], system: str) -> float | None:
    for s in sections:
        for r in s.records if s.name == "lookup" else ():
            if (r["system"], r["size"], r["dtype"], r["dist"]) == (system, GOAL_SIZE, GOAL_DTYPE, "uniform"):
                return r["rate"]
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _goal(what: str, target: str, value: float | None, ok) -> Goal:
    return Goal(what, target, value, None if value is None else bool(ok(value)))


def evaluate_goals(sections: list[Section]) -> list[Goal]:
    ram, lmdb, numpy, redis, same_host = (_lookup_rate(sections, s) for s in (RAM, LMDB, NUMPY, REDIS, RAM_SAME_HOST))
    step_ratio = next((r["ratio_mean"] for s in sections if s.name == "e2e" for r in s.records
                       if r.get("variant") == "memstore+prefetch (sync)"), None)
    decode = {r["variant"]: r["ratio"] for s in sections if s.name == "decode" for r in s.records}
    return [
        _goal("RAM lookup / numpy gather limit (64k fp16)", ">= 0.25", _ratio(ram, numpy),
              lambda v: v >= 0.25),
        _goal("RAM lookup / Redis MGET (64k fp16)", ">= 10", _ratio(ram, redis), lambda v: v >= 10),
        _goal("LMDB lookup / Redis MGET (64k fp16)", ">= 1.5", _ratio(lmdb, redis), lambda v: v >= 1.5),
        _goal("train step time memstore+prefetch / local", "<= 1.03", step_ratio, lambda v: v <= 1.03),
        _goal("same-host lookup / numpy gather limit (64k fp16)", ">= 0.5", _ratio(same_host, numpy),
              lambda v: v >= 0.5),
        _goal("same-host lookup / Redis MGET (64k fp16)", ">= 30", _ratio(same_host, redis), lambda v: v >= 30),
        _goal("decode tokens/s, memstore + prefetch / local", ">= 0.97", decode.get(SAME_HOST), lambda v: v >= 0.97),
        _goal("decode tokens/s, memstore gRPC + prefetch / local", ">= 0.97", decode.get(GRPC), lambda v: v >= 0.97),
    ]
