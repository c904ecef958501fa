"""`mmkd-distill train`: train the teacher if none is given, distil the student, evaluate on test.

Reads top to bottom: arguments -> config -> data -> teacher phase -> student phase -> evaluation (-> baselines).
One function, ``train_phase``, trains any model with any weighted loss; the teacher is a phase with only the
hard-label term, the student a phase with the distillation terms and a frozen teacher. Runs the same under
``torchrun --nproc_per_node=N`` (DistributedDataParallel; gloo on CPU, nccl on GPU): each rank takes its slice
of every global batch, so the step count and the effective batch do not depend on the number of processes.

Teacher outputs are computed under ``no_grad`` and bf16 autocast. By default every step shows a new augmented
view, so the teacher runs every step. ``loss.teacher_cache_views = V`` caches them per augmented view instead:
the student replays the first V epochs (same batches, same views) and the teacher runs only while they fill,
which on the default pair makes each replayed step 1.7x faster (18.3 vs 10.5 steps/s on 2 CPU threads: a
teacher pass costs more than a student step).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from distill.augment import augment_images, mixup, step_generator
from distill.config import Config, PhaseConfig, load_config
from distill.errors import CheckpointError
from distill.losses import WeightedLoss, output_dims
from distill.models import create_model
from distill.models.common import MultimodalOutput
from distill.runs import (atomic_write_json, ensure_embedded, load_data, load_model_dir, load_train_state, read_json,
                          save_train_state, save_tensors, unwrap, write_last_copies, write_model_card)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="shapes", help="TOML file or shipped config name (default: shapes)")
    parser.add_argument("--out", required=True, help="run folder (created; reused with --resume)")
    parser.add_argument("--data", default=None, help="dataset folder (default: generate the embedded one in RUN/data)")
    parser.add_argument("--teacher", default=None, help="teacher folder: RUN/teacher of an earlier run or a CLIPModel folder")
    parser.add_argument("--resume", action="store_true", help="continue each phase from its last checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--baselines", action="store_true", help="also run the KD-vs-scratch regimes and single-modality baselines")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs one line per validation)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    dist = Dist.setup()
    try:
        result = train_run(cfg, Path(args.out), data=args.data, teacher=args.teacher, resume=args.resume,
                           baselines=args.baselines, progress=not args.no_progress, dist=dist)
        if dist.rank == 0:
            from distill.evaluate import print_table
            print_table(result)
        return 0
    finally:
        dist.close()


# ---------------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def setup(cls) -> "Dist":
        """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = torch.cuda.is_available()
        if world > 1:
            import torch.distributed as td

            td.init_process_group("nccl" if use_cuda else "gloo")
            rank = td.get_rank()
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        else:
            rank = 0
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return cls(rank, world, device)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the run


def train_run(cfg: Config, out: Path, *, data: Optional[str] = None, teacher: Optional[str] = None,
              resume: bool = False, baselines: bool = False, progress: bool = True,
              dist: Optional[Dist] = None) -> Dict[str, Any]:
    """The whole job; returns the metrics dict also written to ``RUN/metrics.json``."""
    from distill.evaluate import evaluate_models

    dist = dist or Dist()
    _seed_everything(cfg)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data_dir = Path(data) if data else ensure_embedded(out / "data", cfg, dist)
    _write_config(out, cfg, resume, dist, data_dir)
    bundle = load_data(data_dir, cfg, out, transfer=baselines)
    timings: Dict[str, float] = {"data_s": time.perf_counter() - t0}

    if teacher is not None:
        teacher_model = load_teacher(Path(teacher), bundle, cfg, out / "teacher", dist, progress)
    else:
        t = time.perf_counter()
        teacher_model = train_phase("teacher", cfg.teacher, {"ce": 1.0}, bundle, out / "teacher", cfg,
                                    resume=True, seed=cfg.seed, dist=dist, progress=progress)
        timings["teacher_s"] = time.perf_counter() - t
    t = time.perf_counter()
    student = train_phase("student", cfg.student, cfg.loss.weights(), bundle, out / "student", cfg,
                          teacher=teacher_model, resume=resume, seed=cfg.seed, dist=dist, progress=progress)
    timings["student_s"] = time.perf_counter() - t
    metrics: Dict[str, Any] = {}
    if dist.rank == 0:
        metrics = evaluate_models({"teacher": teacher_model, "student": student}, bundle, cfg)
    if baselines:
        from distill.evaluate import run_baselines

        metrics["baselines"] = run_baselines(cfg, bundle, teacher_model, out / "baselines", dist, progress)
    timings["total_s"] = time.perf_counter() - t0
    metrics["timings"] = timings
    metrics["config_hash"] = cfg.hash()
    if dist.rank == 0:
        atomic_write_json(out / "metrics.json", metrics)
    dist.barrier()
    return metrics


def _seed_everything(cfg: Config) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _write_config(out: Path, cfg: Config, resume: bool, dist: Dist, data_dir: Path) -> None:
    path = out / "config.json"
    if resume and path.is_file():
        old = read_json(path).get("hash")
        if old != cfg.hash():
            raise CheckpointError(f"--resume with a different config: {path} has hash {old}, this run {cfg.hash()}; "
                                  "use the same --config/--set as the interrupted run or a new --out")
    if dist.rank == 0:
        # data_dir: where the dataset was read, so `mmkd-export` finds the test split without --data
        atomic_write_json(path, {"config": cfg.to_dict(), "hash": cfg.hash(), "data_dir": str(data_dir.resolve())})


# ---------------------------------------------------------------------------------------------- one phase


class StepModule(nn.Module):
    """Model + loss as one module, so DDP all-reduces the loss's projection heads with the model."""

    def __init__(self, model: nn.Module, loss: WeightedLoss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, x, ids, mask, labels, t_out=None, labels_b=None, lam: float = 1.0):  # noqa: ANN001
        out = self.model(x, ids, mask)
        total, parts = self.loss(out, t_out, labels, labels_b=labels_b, lam=lam)
        return total, parts, out.logits.detach()


def lr_at(step: int, phase: PhaseConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to zero at ``phase.steps``; or constant (the FiLM models'
    breakthrough comes late, and a decaying rate can stall it before it happens); or warmup-stable-decay
    ("wsd"): constant, then cosine to zero over the last ``decay_fraction`` of the steps, which keeps the
    breakthrough and still settles the weights at the end."""
    if step < phase.warmup_steps:
        return phase.lr * (step + 1) / phase.warmup_steps
    if phase.schedule == "constant":
        return phase.lr
    start = phase.warmup_steps
    if phase.schedule == "wsd":
        start = max(start, phase.steps - int(round(phase.decay_fraction * phase.steps)))
        if step < start:
            return phase.lr
    progress = (step - start) / max(1, phase.steps - start)
    return phase.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast(cfg: Config, device: torch.device):  # noqa: ANN201
    """bf16 autocast where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    enabled = cfg.bf16 and (torch.cuda.is_bf16_supported() if device.type == "cuda"
                            else torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def build_model(name: str, bundle: Any, cfg: Config, seed: int,
                extra: Optional[Mapping[str, Any]] = None) -> tuple[nn.Module, Dict[str, Any]]:
    torch.manual_seed(seed)
    kwargs = {"num_labels": len(bundle.labels), "vocab_size": bundle.vocab_size,
              "max_text_length": cfg.data.max_text_length, **(extra or {})}
    return create_model(name, **kwargs), kwargs


def train_phase(which: str, phase: PhaseConfig, weights: Mapping[str, float], bundle: Any, model_dir: Path,
                cfg: Config, *, teacher: Optional[nn.Module] = None, resume: bool = False, seed: int = 0,
                dist: Optional[Dist] = None, progress: bool = True, train_split: str = "train",
                model_name: Optional[str] = None, model_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Train ``phase.model`` for ``phase.steps`` steps on ``bundle.splits[train_split]``; keep the checkpoint
    with the best validation accuracy. A finished phase found in ``model_dir`` is loaded, not retrained."""
    dist = dist or Dist()
    device = dist.device
    name = model_name or phase.model
    model, kwargs = build_model(name, bundle, cfg, seed, model_kwargs)
    model.to(device)
    train = bundle.splits[train_split]
    state_file = model_dir / "last.state.json"
    if resume and state_file.is_file() and read_json(state_file).get("done"):
        best, _ = load_model_dir(model_dir)
        return best.to(device)

    x0, ids0, m0 = train.pixel_values[:2].to(device), train.input_ids[:2].to(device), train.attention_mask[:2].to(device)
    with torch.no_grad():
        s_dims = output_dims(model.eval()(x0, ids0, m0))
        t_dims = output_dims(teacher(*_teacher_inputs(bundle, train, torch.arange(2), x0, device))) if teacher else s_dims
    model.train()
    loss = WeightedLoss(weights, temperature=cfg.loss.temperature, tau=cfg.loss.tau, feature_kind=cfg.loss.feature_kind,
                        student_dims=s_dims, teacher_dims=t_dims).to(device)
    if loss.needs_teacher and teacher is None:
        raise CheckpointError(f"{which}: loss terms {sorted(loss.weights)} need a teacher")
    step_module = StepModule(model, loss)
    decay = [p for p in step_module.parameters() if p.ndim >= 2]
    no_decay = [p for p in step_module.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": phase.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=phase.lr)
    state: Dict[str, Any] = {"step": 0, "best_val_acc": -1.0, "history": [], "done": False}
    if resume and (model_dir / "resume.safetensors").is_file():
        state = load_train_state(model_dir, step_module, opt)
        if dist.rank == 0:
            write_last_copies(model_dir, model, state)
    if dist.rank == 0:
        write_model_card(model_dir, model_name=name, model_kwargs=kwargs, labels=bundle.labels,
                         preprocess=bundle.spec.to_dict(), tokenizer_src=bundle.tokenizer_path,
                         config_hash=cfg.hash(), extra={"role": which, "loss_weights": dict(loss.weights)})
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_module = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    if teacher is not None:
        teacher.eval().requires_grad_(False)

    n = len(train.labels)
    per_epoch = max(1, n // phase.batch_size)
    eval_every = phase.eval_every or per_epoch
    t_outputs = TeacherOutputs(teacher, per_epoch * cfg.loss.teacher_cache_views) if teacher is not None else None
    bar = _progress(which, phase.steps, state["step"], progress and dist.rank == 0)
    perm_cache: Dict[int, torch.Tensor] = {}
    for step in range(state["step"], phase.steps):
        view = t_outputs.view_of(step) if t_outputs else step  # the step whose batch and augmented view it shows
        epoch, k = divmod(view, per_epoch)
        if epoch not in perm_cache:
            perm_cache = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10007 + epoch))}
        idx = perm_cache[epoch][k * phase.batch_size:(k + 1) * phase.batch_size][dist.rank::dist.world]
        parts, acc = _train_step(step, view, idx, step_module, opt, t_outputs, bundle, train, phase, cfg, seed,
                                 device)
        bar.update(1)
        bar.set_postfix({**{k2: f"{v:.3f}" for k2, v in parts.items()}, "acc": f"{acc:.2f}"}, refresh=False)
        done = step + 1 == phase.steps
        if (step + 1) % eval_every == 0 or done:
            val_acc = accuracy(unwrap(step_module).model, bundle, bundle.splits["validation"], cfg, device)
            unwrap(step_module).model.train()
            state["history"].append({"step": step + 1, "val_acc": val_acc, **parts})
            if not progress and dist.rank == 0:
                print(f"[{which}] step {step + 1}/{phase.steps} val_acc {val_acc:.4f} "
                      + " ".join(f"{k2}={v:.4f}" for k2, v in parts.items()), file=sys.stderr, flush=True)
            if val_acc > state["best_val_acc"]:
                state["best_val_acc"] = val_acc
                if dist.rank == 0:
                    save_tensors(model_dir / "best.safetensors", unwrap(step_module).model.state_dict())
        if done or (step + 1) % eval_every == 0 or (step + 1) % max(1, phase.checkpoint_every) == 0:
            state.update(step=step + 1, done=done)
            if dist.rank == 0:
                save_train_state(model_dir, unwrap(step_module), opt, state)
    bar.close()
    dist.barrier()
    best, _ = load_model_dir(model_dir)
    return best.to(device)


def _teacher_inputs(bundle: Any, split: Any, idx: torch.Tensor, x: torch.Tensor, device: torch.device,
                    ids: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
    """The teacher sees the same (augmented) image; its text comes from its own tokenizer when it has one."""
    if getattr(split, "teacher_input_ids", None) is not None:
        return x, split.teacher_input_ids[idx].to(device), split.teacher_attention_mask[idx].to(device)
    if ids is not None:
        return x, ids, mask
    return x, split.input_ids[idx].to(device), split.attention_mask[idx].to(device)


class TeacherOutputs:
    """The frozen teacher's outputs for each training step, cached per augmented view when ``cycle`` > 0.

    With a cycle, step s shows exactly the batch and augmented view of step s % cycle (the caller replays them),
    so the teacher runs only for the first ``cycle`` steps and every later step costs the student alone. The
    cache lives in memory: after --resume it refills by recomputing, which gives the same outputs."""

    def __init__(self, teacher: nn.Module, cycle: int = 0) -> None:
        self.teacher, self.cycle = teacher, cycle
        self._cache: Dict[int, MultimodalOutput] = {}

    def view_of(self, step: int) -> int:
        return step % self.cycle if self.cycle else step

    def __call__(self, view: int, inputs: tuple) -> MultimodalOutput:
        hit = self._cache.get(view)
        if hit is not None:
            return hit
        with torch.no_grad():
            out = self.teacher(*inputs)
        if self.cycle:
            self._cache[view] = out._replace(spatial=None)  # feature maps are too large to keep (config refuses)
        return out


def _train_step(step: int, view: int, idx: torch.Tensor, step_module: nn.Module, opt: torch.optim.Optimizer,
                t_outputs: Optional[TeacherOutputs], bundle: Any, split: Any, phase: PhaseConfig, cfg: Config,
                seed: int, device: torch.device) -> tuple[Dict[str, float], float]:
    """One optimiser step at ``step`` (the lr) on the batch ``idx`` seen as view ``view`` (the augmentation)."""
    x = split.pixel_values[idx]  # (b, 3, H, W)
    ids, mask, labels = split.input_ids[idx], split.attention_mask[idx], split.labels[idx]
    length = max(1, int(mask.sum(1).max()))  # trim padding columns: models are mask-aware, this is only speed
    ids, mask = ids[:, :length], mask[:, :length]
    gen = step_generator(seed, view, salt=int(os.environ.get("RANK", "0")))
    labels_b, lam = None, 1.0
    if cfg.augment.enabled:
        x = augment_images(x, gen, shift=cfg.augment.shift, brightness=cfg.augment.brightness,
                           noise_std=cfg.augment.noise_std)
        x, labels_b, lam = mixup(x, labels, cfg.augment.mixup_alpha, gen)
    x, ids, mask, labels = x.to(device), ids.to(device), mask.to(device), labels.to(device)
    labels_b = labels_b.to(device) if labels_b is not None else None
    for g in opt.param_groups:
        g["lr"] = lr_at(step, phase)
    with autocast(cfg, device):
        t_out = None
        if t_outputs is not None:
            t_out = t_outputs(view, _teacher_inputs(bundle, split, idx, x, device, ids, mask))
        total, parts, logits = step_module(x, ids, mask, labels, t_out, labels_b, lam)
    opt.zero_grad(set_to_none=True)
    total.backward()
    if phase.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(step_module.parameters(), phase.grad_clip)
    opt.step()
    keep = labels >= 0
    acc = float((logits.argmax(-1)[keep] == labels[keep]).float().mean()) if bool(keep.any()) else float("nan")
    return parts, acc


@torch.no_grad()
def predict_logits(model: nn.Module, split: Any, cfg: Config, device: torch.device, batch_size: int = 512,
                   teacher_text: bool = False) -> torch.Tensor:
    """Logits (N, C) in float32 for a whole split, in eval mode."""
    model.eval()
    outs: List[torch.Tensor] = []
    n = len(split.labels)
    use_t = teacher_text and getattr(split, "teacher_input_ids", None) is not None
    ids_all = split.teacher_input_ids if use_t else split.input_ids
    mask_all = split.teacher_attention_mask if use_t else split.attention_mask
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        with autocast(cfg, device):
            out = model(split.pixel_values[sl].to(device), ids_all[sl].to(device), mask_all[sl].to(device))
        outs.append(out.logits.float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def accuracy(model: nn.Module, bundle: Any, split: Any, cfg: Config, device: torch.device) -> float:
    logits = predict_logits(model, split, cfg, device)
    keep = split.labels >= 0
    return float((logits.argmax(-1)[keep] == split.labels[keep]).float().mean())


def _progress(which: str, total: int, start: int, enabled: bool):  # noqa: ANN201
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=which, disable=not enabled, mininterval=1.0, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- user teachers


def load_teacher(path: Path, bundle: Any, cfg: Config, model_dir: Path, dist: Dist, progress: bool) -> nn.Module:
    """A teacher folder: ``RUN/teacher`` of an earlier mmkd run (used as is), or a Hugging Face ``CLIPModel``
    folder (its towers plus a new FiLM fusion head, fine-tuned on the task's labels into ``model_dir``)."""
    from distill.errors import TeacherLoadError

    if (path / "model.json").is_file():
        model, card = load_model_dir(path)
        if list(card["labels"]) != list(bundle.labels):
            raise TeacherLoadError(f"teacher {path} was trained on labels {card['labels'][:6]}..., this dataset has "
                                   f"{bundle.labels[:6]}...; distil from a teacher trained on the same label set")
        _attach_teacher_text(bundle, path / card.get("tokenizer", "tokenizer.json"))
        return model.to(dist.device)
    if (path / "config.json").is_file():
        from distill.models.clip_teacher import clip_teacher_kwargs

        kwargs = clip_teacher_kwargs(path)
        if not (path / "tokenizer.json").is_file():
            raise TeacherLoadError(f"{path} has no tokenizer.json; save the CLIP tokenizer there "
                                   "(CLIPTokenizerFast.save_pretrained writes it)")
        _attach_teacher_text(bundle, path / "tokenizer.json")
        return train_phase("teacher", cfg.teacher, {"ce": 1.0}, _teacher_view(bundle, path / "tokenizer.json"),
                           model_dir, cfg, resume=True, seed=cfg.seed, dist=dist, progress=progress,
                           model_name="clip_teacher", model_kwargs=kwargs)
    raise TeacherLoadError(f"{path} is neither an mmkd teacher folder (model.json) nor a Hugging Face model folder "
                           "(config.json)")


def _attach_teacher_text(bundle: Any, tokenizer: Path) -> None:
    """Tokenise every split with the teacher's own tokenizer when it differs from the student's."""
    from export.bundle import TextEncoder

    if not tokenizer.is_file() or tokenizer.read_bytes() == Path(bundle.tokenizer_path).read_bytes():
        return
    enc = TextEncoder(tokenizer, bundle.spec)
    for split in bundle.splits.values():
        ids, mask = enc.encode(split.texts)
        split.teacher_input_ids, split.teacher_attention_mask = torch.from_numpy(ids), torch.from_numpy(mask)


def _teacher_view(bundle: Any, tokenizer: Path) -> Any:
    """The dataset as the teacher reads it: its own token ids in place of the student's."""
    import dataclasses

    splits = {name: dataclasses.replace(s, input_ids=s.teacher_input_ids, attention_mask=s.teacher_attention_mask)
              if s.teacher_input_ids is not None else s for name, s in bundle.splits.items()}
    return dataclasses.replace(bundle, splits=splits, tokenizer_path=tokenizer)
