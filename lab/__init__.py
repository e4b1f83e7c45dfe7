"""Research and training tools beside the product: training the embedded prior and the evaluation classifier,
the SDS protocol's paired statistics and the Fig. 6 ablation, and diagnostics of the prior. engine/ and
playground/ never import this package; see lab/README.md."""
