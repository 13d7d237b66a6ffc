"""Layer 5, the lowering vocabulary shared by the integer passes: code chains (how a
quantization point's codes travel through element-moving ops), and the non-finite guard."""
