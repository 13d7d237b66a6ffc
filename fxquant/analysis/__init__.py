"""Layer 7, measuring a compiled graph: the numeric diff (per node, per pass), integer
equivalence with the fake-quant graph, per-point statistics and sensitivity. Runs graphs;
never rewrites them for the pipeline."""
