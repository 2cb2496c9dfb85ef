"""The block-sequential engine: one transformer block's Linear layers from calibration windows to masks.

    hpcprune prune --config configs/llm_wanda.yaml     # schedule.kind: sequential (hpcprune.run.sequential)

A part of the prune floor. `layers` lists a block's prunable Linear weights; `input_statistics` adds up
what each method reads of their inputs (Wanda's per-feature Σx², SparseGPT's Hessian 2/N·ΣXᵀX), one
window at a time, exactly across ranks; `methods` is the interface a method implements (the
statistics it needs, `decide(layer, weight, statistics) -> (mask, new weight or None)`) with
magnitude, Wanda and SparseGPT; `pieces` spreads a block's layers (or, with more ranks than
layers, ranges of their rows) over the ranks by cost; `decisions` moves each layer's decision from the rank that made it to every
rank; `reconstruction` measures ‖WX − ŴX‖² / ‖WX‖²; `activations` keeps a rank's windows in memory
or spilled to disk; `engine` runs one block through all of it. No archive and no pipeline here.
"""
