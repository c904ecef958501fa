"""`mmkd-distill eval --run RUN [--data DIR]` and the evaluation at the end of training.

On the test split: accuracy, macro-F1, per-class recall, one-vs-rest ROC-AUC, per-question-type accuracy,
fidelity of the student to the teacher (top-1 agreement, mean KL), parameters and FLOPs. ``--baselines``
(at train time) adds the KD-vs-scratch regimes and single-modality models, each over several seeds.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np
import torch
from torch import nn

from distill.config import Config, config_from_dict
from distill.metrics import classification_metrics, count_flops, count_params, fidelity, per_group_accuracy
from distill.runs import atomic_write_json, load_data, load_model_dir, read_json, unwrap


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder written by `mmkd-distill train`")
    parser.add_argument("--data", default=None, help="dataset folder (default: RUN/data)")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    cfg = config_from_dict(read_json(run_dir / "config.json")["config"])
    data = load_data(Path(args.data) if args.data else run_dir / "data", cfg, run_dir)
    models = {w: load_model_dir(run_dir / w)[0] for w in ("teacher", "student") if (run_dir / w / "model.json").is_file()}
    if "teacher" in models:  # a teacher with its own tokenizer (e.g. CLIP) reads its own token ids
        from distill.train import _attach_teacher_text

        _attach_teacher_text(data, run_dir / "teacher" / "tokenizer.json")
    metrics = evaluate_models(models, data, cfg)
    old = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    atomic_write_json(run_dir / "metrics.json", {**old, **metrics})
    print_table(metrics)
    return 0


def model_metrics(model: nn.Module, data: Any, cfg: Config, split: str = "test",
                  teacher_text: bool = False) -> tuple[Dict[str, Any], np.ndarray]:
    """Test-split metrics of one model plus its logits (N, C)."""
    from distill.train import predict_logits

    device = next(unwrap(model).parameters()).device
    s = data.splits[split]
    logits = predict_logits(model, s, cfg, device, teacher_text=teacher_text).numpy()
    labels = s.labels.numpy()
    out = classification_metrics(logits, labels, data.labels)
    if s.qtypes and any(s.qtypes):
        out["per_question_type_accuracy"] = per_group_accuracy(logits, labels, s.qtypes)
    m = unwrap(model).cpu()
    out["params"] = count_params(m)
    out["flops"] = count_flops(m, image_size=data.spec.image_size, text_length=16)  # token ids 0/1: valid in any vocab
    unwrap(model).to(device)
    return out, logits


def evaluate_models(models: Mapping[str, nn.Module], data: Any, cfg: Config) -> Dict[str, Any]:
    """Metrics for each model; the student also gets fidelity to the teacher."""
    results: Dict[str, Any] = {}
    logits: Dict[str, np.ndarray] = {}
    for name, model in models.items():
        results[name], logits[name] = model_metrics(model, data, cfg, teacher_text=name == "teacher")
    if "teacher" in logits and "student" in logits:
        results["student"]["fidelity"] = fidelity(logits["student"], logits["teacher"])
        t, s = results["teacher"], results["student"]
        results["summary"] = {
            "student_over_teacher_accuracy": s["accuracy"] / max(t["accuracy"], 1e-12),
            "param_ratio": t["params"] / max(s["params"], 1), "flop_ratio": t["flops"] / max(s["flops"], 1),
        }
    return results


# ---------------------------------------------------------------------------------------------- baselines


def _mean_std(values: List[float]) -> Dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def run_baselines(cfg: Config, data: Any, teacher: nn.Module, out: Path, dist: Any, progress: bool) -> Dict[str, Any]:
    """Regime (a) full labels and (b) few labels + teacher-labelled transfer split: KD student vs the same
    student trained on labels alone, ``cfg.baselines.seeds`` seeds each, same steps; then image-only and
    text-only student-sized models. Each model trains into its own folder under ``out`` (resumable), in
    ``cfg.baselines.workers`` processes at once when more than one."""
    from distill.train import train_phase

    b = cfg.baselines
    few = _few_label_split(data, b, cfg.seed)
    data.splits["few"] = few
    data.splits["few_labelled"] = few.subset(torch.nonzero(few.labels >= 0).flatten())  # all that scratch sees
    jobs = _baseline_jobs(cfg, data, teacher, out)
    if b.workers > 1 and dist.world == 1 and dist.device.type == "cpu":
        _train_in_parallel([job for group in jobs.values() for job in group], b.workers, cfg)
    results: Dict[str, Any] = {"steps": jobs["a_full_kd"][0]["phase"].steps, "seeds": b.seeds,
                               "few_labels": b.few_labels, "transfer_unlabelled": int((few.labels < 0).sum())}
    for key, group in jobs.items():  # finished folders load instead of training again
        accs = [model_metrics(train_phase(**job, dist=dist, progress=progress), data, cfg)[0]["accuracy"]
                for job in group]
        results[key] = _mean_std(accs) if key.endswith(("_kd", "_scratch")) else accs[0]
    return results


def _baseline_jobs(cfg: Config, data: Any, teacher: nn.Module, out: Path) -> Dict[str, List[Dict[str, Any]]]:
    """Every model ``--baselines`` trains, as ``train_phase`` keyword arguments, grouped by result key."""
    b = cfg.baselines
    phase = _baseline_phase(cfg.student, b)
    common = {"which": "student", "phase": phase, "bundle": data, "cfg": cfg, "resume": True}
    splits = {("a_full", "kd"): "train", ("a_full", "scratch"): "train",
              ("b_few", "kd"): "few", ("b_few", "scratch"): "few_labelled"}
    jobs: Dict[str, List[Dict[str, Any]]] = {}
    for (regime, kind), split in splits.items():
        kd = kind == "kd"
        jobs[f"{regime}_{kind}"] = [
            {**common, "weights": cfg.loss.weights() if kd else {"ce": 1.0}, "teacher": teacher if kd else None,
             "model_dir": out / f"{regime}_{kind}_seed{seed}", "seed": cfg.seed + 1000 + seed, "train_split": split}
            for seed in range(b.seeds)]
    if b.include_single_modality:  # the student's own architecture, blind to one modality
        for name in ("image_only", "text_only"):
            jobs[name] = [{**common, "weights": {"ce": 1.0}, "model_dir": out / name, "seed": cfg.seed,
                           "model_name": name, "model_kwargs": {"base": phase.model}}]
    return jobs


_PARALLEL_JOBS: List[Dict[str, Any]] = []  # read by forked workers by index: the data is shared, never pickled


def _train_in_parallel(jobs: List[Dict[str, Any]], workers: int, cfg: Config) -> None:
    """Train independent models in ``workers`` forked processes, the cores split between them. Small models
    use two threads poorly (one student step: 22 it/s on 2 threads, 16 on 1, here), so two one-thread processes
    finish the baselines sooner than one two-thread process. Each writes only its own folder."""
    import multiprocessing

    _PARALLEL_JOBS[:] = jobs
    threads = max(1, (cfg.threads or torch.get_num_threads()) // workers)
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].get("teacher") is None)  # teacher-bound runs first
    try:
        with multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
            for done in pool.imap_unordered(_train_job, [(i, threads) for i in order]):
                print(f"[baselines] finished {done}", flush=True)
    finally:
        _PARALLEL_JOBS.clear()


def _train_job(args: tuple) -> str:
    from distill.train import train_phase

    index, threads = args
    torch.set_num_threads(threads)
    job = _PARALLEL_JOBS[index]
    train_phase(**job, progress=False)
    return str(job["model_dir"])


def _baseline_phase(phase: Any, b: Any) -> Any:
    """The student's phase with the baselines' step budget and validation cadence."""
    import dataclasses

    steps = b.steps if b.steps > 0 else phase.steps
    return dataclasses.replace(phase, steps=steps, warmup_steps=min(phase.warmup_steps, max(1, steps // 10)),
                               eval_every=b.eval_every)


def _few_label_split(data: Any, b: Any, seed: int) -> Any:
    """``few_labels`` labelled train rows + the transfer split (or train rows with labels hidden) unlabelled."""
    from distill.runs import Split

    train = data.splits["train"]
    g = torch.Generator().manual_seed(seed + 99)
    perm = torch.randperm(len(train.labels), generator=g)
    labelled = train.subset(perm[: min(b.few_labels, len(perm))])
    unl = data.splits.get("transfer") or train.subset(perm[min(b.few_labels, len(perm)):])
    if b.transfer > 0:
        unl = unl.subset(torch.arange(min(b.transfer, len(unl.labels))))
    unl_labels = torch.full_like(unl.labels, -1)
    ids, mask = _cat_padded(labelled.input_ids, unl.input_ids), _cat_padded(labelled.attention_mask, unl.attention_mask)
    t_ids = t_mask = None
    if labelled.teacher_input_ids is not None and unl.teacher_input_ids is not None:
        t_ids = _cat_padded(labelled.teacher_input_ids, unl.teacher_input_ids)
        t_mask = _cat_padded(labelled.teacher_attention_mask, unl.teacher_attention_mask)
    return Split(torch.cat([labelled.pixel_values, unl.pixel_values]), ids, mask,
                 torch.cat([labelled.labels, unl_labels]), [], labelled.texts + unl.texts, t_ids, t_mask)


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stack two (N, L) token tensors of different L, right-padding the shorter with 0 (masked out)."""
    length = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, length - t.shape[1]))  # noqa: E731
    return torch.cat([pad(a), pad(b)])


# ---------------------------------------------------------------------------------------------- the table


def print_table(metrics: Mapping[str, Any]) -> None:
    """Plain-text summary of what matters to a reader."""
    rows = [("model", "test acc", "macro-F1", "ROC-AUC", "params", "MFLOPs")]
    for name in ("teacher", "student"):
        m = metrics.get(name)
        if m:
            rows.append((name, f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['roc_auc_ovr']:.4f}",
                         f"{m['params']:,}", f"{m['flops'] / 1e6:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    s = metrics.get("student", {})
    if "fidelity" in s:
        f = s["fidelity"]
        print(f"student/teacher accuracy {metrics['summary']['student_over_teacher_accuracy']:.3f}; "
              f"top-1 agreement {f['top1_agreement']:.4f}; mean KL {f['mean_kl']:.4f}; "
              f"teacher/student params {metrics['summary']['param_ratio']:.1f}x, FLOPs {metrics['summary']['flop_ratio']:.1f}x")
    for name in ("teacher", "student"):
        q = metrics.get(name, {}).get("per_question_type_accuracy")
        if q:
            print(f"{name} per question type: " + ", ".join(f"{k} {v:.3f}" for k, v in q.items()))
    b = metrics.get("baselines")
    if b:
        for key in ("a_full_kd", "a_full_scratch", "b_few_kd", "b_few_scratch"):
            if key in b:
                print(f"{key:16s} {b[key]['mean']:.4f} +- {b[key]['std']:.4f}  ({len(b[key]['values'])} seeds)")
        for key in ("image_only", "text_only"):
            if key in b:
                print(f"{key:16s} {b[key]:.4f}")
