"""Floor 6, train: fine-tuning a masked model.

What lives here: the training loop and evaluation with masks enforced (`finetune`), distillation
from the dense model (`distill`), lottery-ticket rewinding (`rewind`), and epoch checkpoints that
let a stopped training stage continue (`checkpoint`). It may import `prune` (masks) and the floors
below.
"""
