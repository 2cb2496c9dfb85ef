"""Floor 8, read: looking at what a run recorded.

What lives here: `hpcprune inspect` summary and layers (`summary`, with scores recomputed by
`score_stats`), `diff` of two runs, PNG figures (`plots`), the HTML report (`report`) and masks as a
plain safetensors file (`masks_file`). It may import `run` and the floors below; it must not know
`deploy`, its sibling.
"""
