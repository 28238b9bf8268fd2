"""Finding the right function for an utterance: function schemas and exemplars (more to come:
a hybrid index, find-k, embedder fine-tuning). Used by the understanding task at prepare time
and by inference alike."""

from dialogtune.retrieval.exemplars import Exemplar, ExtractionStats, extract_sgd_exemplars, load_exemplars
from dialogtune.retrieval.schemas import Function, Parameter, load_functions, read_functions, write_tools_json

__all__ = ["Exemplar", "ExtractionStats", "Function", "Parameter", "extract_sgd_exemplars", "load_exemplars",
           "load_functions", "read_functions", "write_tools_json"]
