"""Hand activations between pipeline stages (point-to-point over the PP group).

A non-last stage's ``model.forward`` returns its intermediate tensors (for the Llama family
``(hidden, residual)``, each ``[num_tokens, hidden_size]`` in the model dtype); the next stage
passes them as ``intermediate_tensors``. Every rank knows the step's token count from the
step message, so only the payload crosses: no shape header, no extra round trip.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardline.model.parallel_context import ParallelContext
from shardline.model.profiling import timed

NUM_INTERMEDIATE_TENSORS = 2


class PipelineLink:
    """This rank's sends to the next stage and receives from the previous one."""

    def __init__(
        self, parallel_context: ParallelContext, *, hidden_size: int, dtype: torch.dtype
    ) -> None:
        self.ctx = parallel_context
        self.hidden_size = hidden_size
        self.dtype = dtype
        # rank = pp_rank * tp_size + tp_rank: the same TP shard one stage up/down.
        rank = parallel_context.pp_rank * parallel_context.tp_size + parallel_context.tp_rank
        self.prev_rank = rank - parallel_context.tp_size
        self.next_rank = rank + parallel_context.tp_size

    def recv(self, num_tokens: int) -> tuple[torch.Tensor, ...]:
        """The previous stage's intermediate tensors for a step of ``num_tokens`` tokens."""
        tensors = tuple(
            torch.empty(num_tokens, self.hidden_size, dtype=self.dtype, device=self.ctx.device)
            for _ in range(NUM_INTERMEDIATE_TENSORS)
        )
        with timed("pp_p2p"):
            for tensor in tensors:
                dist.recv(tensor, src=self.prev_rank, group=self.ctx.pp_group)
        return tensors

    def send(self, tensors: object) -> None:
        """Pass this stage's output on to the next stage."""
        if not isinstance(tensors, tuple) or len(tensors) != NUM_INTERMEDIATE_TENSORS:
            raise TypeError(
                f"a non-last pipeline stage must return {NUM_INTERMEDIATE_TENSORS} tensors, "
                f"got {type(tensors).__name__}"
            )
        with timed("pp_p2p"):
            for tensor in tensors:
                dist.send(
                    tensor.to(self.dtype).contiguous(), dst=self.next_rank, group=self.ctx.pp_group
                )
