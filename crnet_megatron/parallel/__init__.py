"""How the model is distributed: the parallel plan, stated once.

t = TP size, p = PP size, d = DP size = world / (t p).

* TP (Megatron-Core tensor parallel; ``model/linears.py`` for CR-Net): dense q/k/v/gate/up
  weights and CR-Net B factors of the column positions are split on the output dimension;
  dense o/down weights and CR-Net A factors of the row positions on the input dimension. The
  column positions' A factors (r-wide, small) are replicated and applied to the tokens each
  rank holds, so only r-wide codes cross ranks; the row positions' B factors, beta and the
  norms are replicated. Embedding and output layer are vocab-parallel. No rank needs to divide
  by t.
* SP (``sequence_parallel``): norms, residual stream and the o/down chains hold s/t tokens;
  column projections gather the sequence (dense: X; CR-Net: the r-wide codes), row projections
  reduce-scatter it. Replicated parameters that see a sequence shard (norms, CR-Net column A,
  row B, beta) are summed over TP once per step.
* PP (``pipeline.py``, ``schedule.py``): each stage holds contiguous layers (Megatron's offsets,
  uneven first and last stages allowed), or under interleaving (virtual pipeline) ``v`` model
  chunks of the global layer order (``model.stages``); dense layer 1 is on stage 0; the residual
  stream and the four chains cross every stage and chunk boundary packed into one tensor, under
  Megatron's 1F1B or interleaved schedule.
* DP: Megatron data parallel (DDP, optionally the distributed optimizer) across the rest.
* Recompute (``recompute.py``): Algorithm 1 (``crnet``) or Megatron ``full`` per stage.

``build.build_model`` builds one rank's stage and attaches the stage payload and the recompute
scheme to it; ``groups`` sets up the process groups; ``compat`` is the one place that mends
megatron-core (CPU/gloo adaptations only without CUDA; the torch-Adam distributed-optimizer
checkpoints everywhere).
"""
