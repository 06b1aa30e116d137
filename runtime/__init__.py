"""The torch half of the loop: offloaded execution of Hugging Face MoE models, the trace recorder,
calibration and measured validation (DESIGN.md section 6).

Not built yet: it is the subject of the runtime issue. It needs the optional extra `.[runtime]`
(torch, transformers, safetensors) and never imports simpy.
"""
