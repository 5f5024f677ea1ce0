"""minicompress: Minitron-style structured pruning and distillation of Hugging Face causal LMs.

Score the importance of heads, neurons, embedding channels and layers on calibration
data; rewrite the model into a smaller stock Hugging Face model; recover it by knowledge
distillation from the original (Muralidharan et al., arXiv 2407.14679; Sreenivas et al.,
arXiv 2408.11796).
"""

__version__ = "0.1.0"
