"""Training and evaluation: the same token stream and schedule for the baseline and the Engram model.

Backbone parameters train with AdamW (warm-up, then cosine decay to `min_lr_ratio * lr`). Engram
table rows train elsewhere: on the memstore server (its row-wise Adam, driven by the gradients the
table source ships during backward) or, for `--tables local`, with `RowwiseAdam` here. With
`--table-lr-schedule follow` both follow the backbone's schedule, scaled to the table lr: each
step's update carries its learning rate to the server (measured worse at 300 steps, so not the
default: see docs/demo.md).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from demo.memory import EngramMemory
from demo.model import GPT
from engram_client.prefetch import Prefetcher


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # B sequences of block_size tokens per step
    lr: float = 2e-3  # backbone AdamW peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1  # on matrices only (not norms, biases or the ShortConv)
    grad_clip: float = 1.0  # on backbone gradients (table gradients leave during backward)
    eval_interval: int = 50  # steps between validation checks on `eval_windows` windows
    eval_windows: int = 48
    seed: int = 1337  # model init and the batch stream


@dataclass
class RunResult:
    """Everything one model's training produced (all numbers measured)."""

    name: str
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    wait_ms: list[float] = field(default_factory=list)  # per step: blocked on Engram rows
    rows_per_step: list[int] = field(default_factory=list)  # unique table rows looked up
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)  # on the fixed eval subset
    final_val_loss: float = float("nan")  # on every validation window
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    tokens_seen: int = 0
    load_avg: list[float] = field(default_factory=list)  # 1-min load average at each validation check

    def summary(self) -> dict:
        warm = self.step_ms[5:] or self.step_ms  # the first steps pay for allocator warm-up
        return {
            "final_val_loss": self.final_val_loss,
            "final_val_ppl": math.exp(self.final_val_loss),
            "step_ms_median": float(np.median(warm)),
            "step_ms_mean": float(np.mean(warm)),
            "tokens_per_s": self.tokens_seen / max(self.train_seconds, 1e-9),
            "prefetch_wait_ms_mean": float(np.mean(self.wait_ms)) if self.wait_ms else 0.0,
            "rows_per_step_mean": float(np.mean(self.rows_per_step)) if self.rows_per_step else 0.0,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "tokens_seen": self.tokens_seen,
            # other processes on the machine make step times incomparable: this says how busy it was
            "load_avg_mean": float(np.mean(self.load_avg)) if self.load_avg else float("nan"),
        }


def batch_stream(ids: np.ndarray, batch_size: int, seq_len: int, steps: int, seed: int):
    """`steps` batches {"input_ids": (B, T), "targets": (B, T)} int64, a function of `seed` only.

    The stream is cut into non-overlapping windows of T+1 tokens, visited in a random order; once
    all are used (an epoch) they are reshuffled with a new random phase. So within the first epoch
    no token is trained on twice and the train loss is a loss on unseen text too, and every model
    sees exactly the same tokens in the same order.
    """
    rng = np.random.default_rng(seed)
    window = np.arange(seq_len + 1)
    order: np.ndarray = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:  # new epoch: fresh phase and order
            phase = int(rng.integers(0, seq_len + 1))
            starts = np.arange(phase, len(ids) - seq_len, seq_len + 1)
            order = np.concatenate([order, rng.permutation(starts)])
        take, order = order[:batch_size], order[batch_size:]
        chunk = torch.from_numpy(ids[take[:, None] + window].astype(np.int64))  # (B, T + 1)
        yield {"input_ids": chunk[:, :-1], "targets": chunk[:, 1:]}


def val_windows(ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-overlapping validation windows: inputs and targets, each (W, T)."""
    n = (len(ids) - 1) // seq_len
    x = torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)
    y = torch.from_numpy(ids[1 : n * seq_len + 1].astype(np.int64)).view(n, seq_len)
    return x, y


@torch.no_grad()
def evaluate(model: GPT, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over all windows (every token weighs the same)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        _, loss = model(x[i : i + batch_size], y[i : i + batch_size])
        n = y[i : i + batch_size].numel()
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / count


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def backbone_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over every parameter that is not a table row; decay only on matrices."""
    params = [(n, p) for n, p in model.named_parameters() if ".tables." not in n]
    is_matrix = {n: p.dim() >= 2 and "short_conv" not in n for n, p in params}  # the conv is per-channel
    decay = [p for n, p in params if is_matrix[n]]
    no_decay = [p for n, p in params if not is_matrix[n]]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=False)


def train_model(name: str, model: GPT, train_ids: np.ndarray, val: tuple[torch.Tensor, torch.Tensor],
                cfg: TrainConfig, memory: EngramMemory | None = None, show_progress: bool = True) -> RunResult:
    """Train `model` for cfg.steps steps; evaluate every cfg.eval_interval steps and at the end."""
    result = RunResult(name)
    T = model.config.block_size
    optimizer = backbone_optimizer(model, cfg)
    table_opt = memory.table_optimizer() if memory is not None else None
    remote = memory.remote if memory is not None else None
    batches = batch_stream(train_ids, cfg.batch_size, T, cfg.steps, cfg.seed)
    if remote is not None:
        batches = Prefetcher(batches, model, depth=2)  # rows of batch i+1, i+2 load while i trains
    eval_x, eval_y = val[0][: cfg.eval_windows], val[1][: cfg.eval_windows]
    dense_params = [p for g in optimizer.param_groups for p in g["params"]]

    model.train()
    bar = tqdm(total=cfg.steps, desc=f"{name:>8}", unit="step", dynamic_ncols=True, disable=not show_progress)
    smooth_loss, started = None, time.perf_counter()
    step_start = started  # a step's time includes waiting for its batch (and its prefetched rows)
    for step, batch in enumerate(batches):
        fetched_before = remote.stats.rows_fetched if remote else 0
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        if memory is not None:
            memory.follow_schedule(lr_at(step, cfg) / cfg.lr, table_opt)
        loss = _train_step(model, batch, optimizer, table_opt, dense_params, cfg.grad_clip)
        result.step_ms.append(1e3 * (time.perf_counter() - step_start))
        result.steps.append(step)
        result.train_loss.append(loss)
        if remote is not None:
            result.rows_per_step.append(remote.stats.rows_fetched - fetched_before)
            result.wait_ms.append(1e3 * remote.stats.last_wait_s)
        tokens = batch["input_ids"].numel()
        result.tokens_seen += tokens
        smooth_loss = loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss

        if step % cfg.eval_interval == 0 or step == cfg.steps - 1:
            eval_start = time.perf_counter()
            result.val_steps.append(step)
            result.val_loss.append(evaluate(model, eval_x, eval_y))
            result.load_avg.append(os.getloadavg()[0])
            result.eval_seconds += time.perf_counter() - eval_start
            if not show_progress:  # logs (CI, containers) still get one line per check
                print(f"{name:>8} step {step:>5}/{cfg.steps}: {_postfix(smooth_loss, result, tokens)}")
        bar.set_postfix_str(_postfix(smooth_loss, result, tokens), refresh=False)
        bar.update(1)
        step_start = time.perf_counter()
    bar.close()
    if memory is not None:
        memory.flush()  # the last step's update must land before the final evaluation
    result.train_seconds = time.perf_counter() - started - result.eval_seconds

    eval_start = time.perf_counter()
    result.final_val_loss = evaluate(model, *val)
    result.eval_seconds += time.perf_counter() - eval_start
    return result


def _train_step(model: GPT, batch: dict, optimizer: torch.optim.Optimizer, table_opt: torch.optim.Optimizer | None,
                dense_params: list[torch.Tensor], grad_clip: float) -> float:
    """One forward/backward/update; returns the batch loss."""
    _, loss = model(batch["input_ids"], batch["targets"])
    optimizer.zero_grad(set_to_none=True)
    if table_opt is not None:
        table_opt.zero_grad(set_to_none=True)
    loss.backward()  # remote tables ship their row gradients from inside this call
    torch.nn.utils.clip_grad_norm_(dense_params, grad_clip)
    optimizer.step()
    if table_opt is not None:
        table_opt.step()
    return loss.item()


def _postfix(smooth_loss: float, result: RunResult, tokens_per_step: int, window: int = 10) -> str:
    """Progress numbers averaged over the last `window` steps (one step alone is too noisy)."""
    recent_s = 1e-3 * sum(result.step_ms[-window:])
    steps = len(result.step_ms[-window:])
    parts = [f"loss {smooth_loss:.3f}"]
    if result.val_loss:
        parts.append(f"val {result.val_loss[-1]:.3f}")
    parts.append(f"{tokens_per_step * steps / recent_s:,.0f} tok/s")
    if result.rows_per_step:
        parts.append(f"{sum(result.rows_per_step[-window:]) / recent_s:,.0f} rows/s")
        parts.append(f"wait {sum(result.wait_ms[-window:]) / steps:.1f} ms")
    return ", ".join(parts)
