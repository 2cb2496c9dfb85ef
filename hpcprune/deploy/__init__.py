"""Floor 8, deploy: a round turned into a file to deploy.

What lives here: `hpcprune export` (`export`), the round rebuilt from the archive (`round_model`),
the formats and reading them back (`formats`), compaction of silent channels (`compact`), sparse
tensor encodings (`sparse`), int8 quantization (`quantize`), the figures of an export
(`measure`), and a Hugging Face folder of an `hf:` run (`hf_folder`), written tensor by tensor
(`hpcprune.models.safetensors_stream`). It may import `run` and the floors below; it must not know `read`, its sibling.
"""
