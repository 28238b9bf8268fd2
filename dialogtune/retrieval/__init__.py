"""Finding the right function for an utterance: function schemas, exemplars, a hybrid index,
find-k and embedder fine-tuning. Used by the understand task at prepare time and by inference
alike."""

from dialogtune.retrieval.exemplars import Exemplar, ExtractionStats, extract_sgd_exemplars, load_exemplars
from dialogtune.retrieval.fusion import fuse
from dialogtune.retrieval.index import Candidate, RetrievalIndex, build_index, load_index, save_index
from dialogtune.retrieval.schemas import Function, Parameter, load_functions, read_functions, write_tools_json

__all__ = ["Candidate", "Exemplar", "ExtractionStats", "Function", "Parameter", "RetrievalIndex", "build_index",
           "extract_sgd_exemplars", "fuse", "load_exemplars", "load_functions", "load_index", "read_functions",
           "save_index", "write_tools_json"]
