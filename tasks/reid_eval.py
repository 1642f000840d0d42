"""ReID evaluation under the Market-1501 protocol: :class:`ReIDEvaluation`, the evaluation half of
:class:`tasks.reid.ReIDTask`.

Every process embeds its share of the query and gallery images; the embeddings are gathered and
ranked once (mAP, mINP, CMC rank-1/5/10; cosine or euclidean distances, optional average query
expansion and k-reciprocal re-ranking: :func:`vggbackbone.metrics.rank_embeddings`), written to
``<log_dir>/<stage>_metrics.json`` (:func:`tasks.reporting.publish_metrics`), with the queries the
ranking skipped (``queries_without_match``; of them, ``queries_without_gallery``: those whose
identity has no gallery image at all, named in ``query_ids_without_gallery``), and a retrieval
grid ``<log_dir>/retrieval/<stage>[_epochNNN].png``. An evaluation that ranks nothing (no query
or no gallery image embedded) says why, counting the unreadable images of each side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from tasks.distributed import all_gather_objects
from tasks.pictures import log_picture
from tasks.reporting import EvalReport, publish_metrics
from tasks.skips import SkippedSample
from tasks.tta import reid_embeddings
from vggbackbone.metrics import rank_embeddings

__all__ = ["ReIDEvaluation"]


def _listed(ids: list[int], limit: int = 10) -> str:
    return f"{len(ids)}" + (f": {ids[:limit]}{' ...' if len(ids) > limit else ''}" if ids else "")


class ReIDEvaluation:
    """The ``eval_*`` hooks of :class:`tasks.module.TaskModule` for a ReID task (a mixin: ``self`` is
    the task, with ``self.model`` embedding images in eval mode and the ranking options in ``hparams``)."""

    _eval_parts: list[tuple[Tensor, ...]]

    def _sync_buffers(self) -> None:
        """Give every process rank 0's BatchNorm statistics before evaluating.

        DDP broadcasts buffers only before *training* forwards; each rank's last training step
        then updates its running statistics with its own batch, so without this each process
        would embed with slightly different BatchNorm statistics, and none of them with those
        of the checkpoint (saved by rank 0).
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for buf in self.buffers():
                dist.broadcast(buf, src=0)

    def eval_epoch_start(self, stage: str) -> None:
        self._sync_buffers()

    def eval_step(self, batch: dict[str, Any]) -> None:
        if batch["image"].numel() == 0:
            return
        normalize = bool(getattr(self.model, "normalize", False))  # model.tta: + the flip's (tasks.tta)
        emb = reid_embeddings(self.model, batch["image"], self.tta, normalize=normalize)
        self._eval_parts.append(
            (batch["index"].cpu(), batch["pid"].cpu(), batch["camid"].cpu(), batch["is_query"].cpu(), emb.float().cpu())
        )

    def eval_epoch_end(self, stage: str) -> None:
        parts, self._eval_parts = self._eval_parts, []
        local = [torch.cat(t).numpy() for t in zip(*parts)] if parts else None
        skipped = self.eval_skipped
        arrays = [g for g in all_gather_objects(local) if g is not None]

        def compute(log_dir: Path) -> EvalReport | None:
            if not arrays:
                return EvalReport({}, no_metric=f"no image of the {stage} split embedded ({len(skipped)} skipped)")
            return self._rank(stage, log_dir, *[np.concatenate(a) for a in zip(*arrays)], skipped=skipped)

        publish_metrics(self, stage, compute, prog_bar=("mAP", "rank1"))

    def _rank(
        self,
        stage: str,
        log_dir: Path,
        index: np.ndarray,
        pid: np.ndarray,
        camid: np.ndarray,
        is_query: np.ndarray,
        emb: np.ndarray,
        skipped: Sequence[SkippedSample] = (),
    ) -> EvalReport:
        index, first = np.unique(index, return_index=True)  # one embedding per sample
        pid, camid, is_query, emb = pid[first], camid[first], is_query[first], emb[first]
        hp = self.hparams
        feats = torch.from_numpy(emb).to(self.device)
        q, g = is_query, ~is_query
        if not q.any() or not g.any():  # every query (or gallery) image unreadable, or a split cut short
            return EvalReport({}, no_metric=self._why_no_ranking(stage, int(q.sum()), int(g.sum()), skipped))
        try:
            res = rank_embeddings(
                feats[torch.from_numpy(q).to(self.device)],
                feats[torch.from_numpy(g).to(self.device)],
                pid[q], pid[g], camid[q], camid[g],
                metric=hp.distance, max_rank=hp.max_rank, chunk_size=hp.eval_chunk_size,
                rerank=hp.rerank, k1=hp.rerank_k1, k2=hp.rerank_k2, lambda_value=hp.rerank_lambda,
                aqe=hp.aqe, aqe_times=hp.aqe_times, aqe_k=hp.aqe_k, aqe_alpha=hp.aqe_alpha,
                topk=hp.grid_topk if hp.grid_queries > 0 else 0,
            )  # fmt: skip
        except ValueError as e:  # no query has a match: raised on every process by publish_metrics, not here
            return EvalReport({}, no_metric=f"{stage} split: {e}")
        fitting = self.trainer.state.fn is not None and self.trainer.state.fn.value == "fit"
        name = f"{stage}_epoch{self.current_epoch:03d}" if fitting else stage  # val_epoch003.png, val.png, test.png
        absent = np.setdiff1d(pid[q], pid[g])  # query identities no gallery image has: never matchable
        extra: dict[str, Any] = {
            "num_query": int(q.sum()),
            "num_gallery": int(g.sum()),
            "num_valid_queries": res.num_valid_queries,
            "queries_without_match": int(q.sum()) - res.num_valid_queries,
            "queries_without_gallery": int(np.isin(pid[q], absent).sum()),
            "query_ids_without_gallery": absent.tolist(),
            "cmc": res.cmc.tolist(),
            "distance": hp.distance,
            "rerank": hp.rerank,
            "aqe": hp.aqe,
        }
        grid = self._save_grid(log_dir / "retrieval" / f"{name}.png", index[q], index[g], res)
        if grid is not None:
            extra["retrieval_grid"] = str(grid)
        return EvalReport(
            res.as_dict(),
            extra=extra,
            title=f"ReID {name}",
            table=[
                ("queries", [int(q.sum())]),
                ("queries skipped (no match)", [extra["queries_without_match"]]),
                ("query ids not in gallery", [_listed(extra["query_ids_without_gallery"])]),
                ("gallery", [int(g.sum())]),
                ("distance", [hp.distance + (" + AQE" if hp.aqe else "") + (" + re-ranking" if hp.rerank else "")]),
            ],
        )

    def _why_no_ranking(self, stage: str, nq: int, ng: int, skipped: Sequence[SkippedSample]) -> str:
        """Why ranking had no query or no gallery image: per empty side, its unreadable (skipped) count."""
        dm = getattr(self.trainer, "datamodule", None)
        sets = {"query": getattr(dm, "query_set", None), "gallery": getattr(dm, "gallery_set", None)}
        query_paths = {str(s.path) for s in getattr(sets["query"], "samples", ())}
        by_side = {
            "query": [s for s in skipped if str(s.path) in query_paths],
            "gallery": [s for s in skipped if str(s.path) not in query_paths],
        }
        parts = []
        for side, n in (("query", nq), ("gallery", ng)):
            if n:
                continue
            bad, total = by_side[side], len(sets[side]) if sets[side] is not None else None
            of_total = f" of {total}" if total is not None else ""
            text = f"no {side} image embedded: {len(bad)}{of_total} {side} images unreadable (skipped)"
            if bad:
                text += f", e.g. {bad[0].path}: {bad[0].reason}"
            if total is not None and len(bad) < total:
                text += f"; the other {total - len(bad)} were not reached (trainer.limit_{stage}_batches?)"
            parts.append(text)
        return f"{stage} split: {'; '.join(parts)} ({nq} query, {ng} gallery images embedded); ranking needs both"

    def _save_grid(self, path: Path, q_index: np.ndarray, g_index: np.ndarray, res: Any) -> Path | None:
        dm = getattr(self.trainer, "datamodule", None)
        if res.topk is None or not hasattr(dm, "eval_samples"):
            return None
        from tasks.reid_viz import save_retrieval_grid

        samples = dm.eval_samples()
        rows = np.linspace(0, len(q_index) - 1, min(self.hparams.grid_queries, len(q_index))).round().astype(int)
        q_paths = [samples[q_index[r]].path for r in rows]
        results = [[samples[g_index[j]].path for j in res.topk[r] if j >= 0] for r in rows]
        matches = [[bool(m) for j, m in zip(res.topk[r], res.topk_match[r]) if j >= 0] for r in rows]
        path, _ = save_retrieval_grid(path, q_paths, results, matches)
        log_picture(self, "retrieval", path)  # TensorBoard, MLflow, W&B
        return path
