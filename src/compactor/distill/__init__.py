"""Knowledge distillation: losses on logits and hidden states, students built from the teacher
(layer drop, width cuts, smaller configs), teacher signals (live, cached top-k, generated text,
on-policy), and a resumable, torchrun-ready trainer."""
