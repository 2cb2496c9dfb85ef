"""Floor 4, models: what is pruned and what it is fed.

What lives here: the model registry and checkpoints (`builders`: built-ins, `package.module:callable`,
safetensors and weights-only state dicts), Hugging Face style folders (`hf`) and the token windows
of their calibration and evaluation text (`text_windows`), the prunable tensors
of a module or of a checkpoint on disk read tensor by tensor (`weights`) and safetensors files
written tensor by tensor (`safetensors_stream`: fan-out's weights, export's Hugging Face shards), and
the image data (`data`). For models too large for one process: the meta-device `skeleton` and its
blocks, the folder's tensors by name (`tensor_files`), the `lazy` model that holds one block at a
time, the blocks' calls as the model's forward makes them (`block_calls`), and what an evaluation
window contributes (`evaluation`). It may import `dist` and the floors below; it knows nothing of
pruning.
"""
