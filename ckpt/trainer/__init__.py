"""The bundled Megatron-style MoE trainer (``torchrun -m ckpt.trainer`` or ``ckpt train``)."""
