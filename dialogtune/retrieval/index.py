"""The hybrid retrieval index: which functions might an utterance mean?

    index = build_index(functions, exemplars)            # embeds with minilm-l6-v2 by default
    save_index(index, Path("sgd-index"))
    index = load_index(Path("sgd-index"))
    for candidate in index.retrieve("Book me a table for 4 in Sausalito"):
        print(candidate.function.name, candidate.score, [e.template for e in candidate.exemplars])

Three searches, each giving up to `top_k` functions, best first:
- descriptions by dense embedding (asymmetric: the query may carry an instruction prefix, for
  models trained with one; MiniLM has none);
- exemplar templates by dense embedding (symmetric: utterance against template, no prefix), with
  `<slot>` read as the slot's words (`<restaurant_name>` -> "restaurant name");
- the same templates by BM25 keywords (`bm25s`, English stop words, Snowball stemming), with
  snake_case and camelCase split into words.
An exemplar search reads up to `top_k * max_exemplars` templates and keeps the first `top_k`
functions among their owners, each with its best `max_exemplars` templates, so a function with
many near-identical templates cannot crowd the others out. The three function lists are merged by
`fusion.fuse` (reciprocal-rank fusion by default).

Search is exact (a matrix product over unit vectors) up to VECTOR_INDEX_FROM templates: over
SGD's 7k it is a few milliseconds a query. From there on the templates also go into a usearch HNSW
index (inner product over the same unit vectors), which reads the nearest `VECTOR_CANDIDATES`
times what a search needs, and only those rows are scored: approximate, but flat in the corpus size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

import dialogtune
from dialogtune.errors import DataError, ModelError
from dialogtune.files import staged_dir, write_json, write_jsonl
from dialogtune.readers._io import iter_jsonl
from dialogtune.retrieval.embedder import DEFAULT_EMBEDDER, NORMALISATION, embed, load_embedder, resolve_embedder
from dialogtune.retrieval.exemplars import PLACEHOLDER, Exemplar
from dialogtune.retrieval.fusion import fuse, union
from dialogtune.retrieval.schemas import Function, read_functions, tools_json, write_tools_json

VECTOR_INDEX_FROM = 50_000  # templates from which dense search goes through a vector index
VECTOR_CANDIDATES = 4  # a vector-index search reads this many times the rows a search needs
INDEX_KIND = "dialogtune-retrieval-index"
FORMAT_VERSION = 1
KEYWORDS = {"stopwords": "en", "stemmer": "english"}
CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


@dataclass(frozen=True)
class Candidate:
    function: Function
    score: float  # the fused score (its scale depends on the fusion rule)
    exemplars: tuple[Exemplar, ...] = ()  # the function's best matching exemplars, best first


@dataclass
class Hits:
    """What each search found for one query: (function name, score) best first, and the rows of
    the exemplars behind each exemplar hit, best first."""
    descriptions: list[tuple[str, float]]
    exemplars_dense: list[tuple[str, float]] = field(default_factory=list)
    exemplars_keyword: list[tuple[str, float]] = field(default_factory=list)
    exemplar_rows: dict[str, list[int]] = field(default_factory=dict)


def template_text(template: str) -> str:
    """A template as the embedder and BM25 read it: each `<slot>` as the slot's words."""
    return PLACEHOLDER.sub(lambda m: m.group(1).replace("_", " "), template)


def keyword_text(text: str) -> str:
    """Identifiers split into words, so that `get_weather` and `GetWeather` match "weather"."""
    return CAMEL_BOUNDARY.sub(" ", text).replace("_", " ")


@functools.cache
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer(KEYWORDS["stemmer"])


def _keyword_tokens(texts: Sequence[str], *, return_ids: bool):
    import bm25s

    return bm25s.tokenize([keyword_text(text) for text in texts], stopwords=KEYWORDS["stopwords"],
                          stemmer=_stemmer(), return_ids=return_ids, show_progress=False)


def _top(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best rows, best first; equal scores in row order."""
    if k <= 0 or len(scores) == 0:
        return []
    rows = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    rows = rows[np.lexsort((rows, -scores[rows]))]
    return [(int(row), float(scores[row])) for row in rows]


def corpus_fingerprint(functions: Sequence[Function], exemplars: Sequence[Exemplar], embedder: str,
                       query_instruction: str) -> str:
    digest = hashlib.sha256()
    digest.update(orjson.dumps([tools_json(functions), [_exemplar_record(e) for e in exemplars], embedder,
                                query_instruction, NORMALISATION, KEYWORDS]))
    return digest.hexdigest()[:16]


def _exemplar_record(exemplar: Exemplar) -> dict:
    return {"function": exemplar.function, "utterance": exemplar.utterance, "template": exemplar.template,
            "arguments": exemplar.arguments, "source": list(exemplar.source)}


def _exemplar_from_record(record: dict) -> Exemplar:
    return Exemplar(record["function"], record["utterance"], record["template"], record["arguments"],
                    tuple(record["source"]))


class RetrievalIndex:
    def __init__(self, functions: Sequence[Function], exemplars: Sequence[Exemplar], model, embedder: str,
                 description_vectors: np.ndarray, exemplar_vectors: np.ndarray, keywords, query_instruction: str = "",
                 vectors=None):
        self.functions = list(functions)
        self.exemplars = list(exemplars)
        self.model = model
        self.embedder = embedder
        self.description_vectors = description_vectors
        self.exemplar_vectors = exemplar_vectors
        self.keywords = keywords  # a bm25s.BM25 over the templates, or None without exemplars
        self.query_instruction = query_instruction
        self.vectors = vectors  # a usearch Index over exemplar_vectors (row = key), or None: exact search
        self.by_name = {function.name: function for function in self.functions}
        # each exemplar's dialogue (or file): a training query must not find its own turn
        self._exemplar_groups = np.array([str(e.source[0]) for e in self.exemplars], dtype=object)
        self._exemplar_owners = np.array([e.function for e in self.exemplars], dtype=object)
        self._function_names = np.array([f.name for f in self.functions], dtype=object)

    @property
    def dimension(self) -> int:
        return int(self.description_vectors.shape[1])

    def _exemplar_hits(self, scores: np.ndarray, top_k: int, max_exemplars: int) -> list[tuple[str, list]]:
        """The first top_k owner functions among the best templates, each with its best rows."""
        owners: dict[str, list[tuple[int, float]]] = {}
        for row, score in _top(scores, top_k * max_exemplars):
            name = self.exemplars[row].function
            if name in owners:
                if len(owners[name]) < max_exemplars:
                    owners[name].append((row, score))
            elif len(owners) < top_k:
                owners[name] = [(row, score)]
        return list(owners.items())

    def _dense_scores(self, query: np.ndarray, needed: int, exclude_group: str | None) -> np.ndarray:
        """Every template's score against the query: exact, or through the vector index, where
        the rows it did not return score -inf."""
        if self.vectors is None:
            return self.exemplar_vectors @ query
        excluded = int(np.count_nonzero(self._exemplar_groups == exclude_group)) if exclude_group is not None else 0
        found = self.vectors.search(query, min(len(self.exemplars), needed * VECTOR_CANDIDATES + excluded))
        scores = np.full(len(self.exemplars), -np.inf, dtype=np.float32)
        rows = np.asarray(found.keys, dtype=np.int64)
        scores[rows] = self.exemplar_vectors[rows] @ query  # exact scores of the rows found
        return scores

    def embed_queries(self, utterances: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each utterance's query vectors (for descriptions, for exemplars), embedded in batches:
        many queries at once cost far less than one at a time."""
        if not utterances:
            return []
        for_descriptions = embed(self.model, utterances, prefix=self.query_instruction)
        # exemplars are searched symmetrically: utterance against template, no instruction
        for_exemplars = embed(self.model, utterances) if self.query_instruction else for_descriptions
        return list(zip(for_descriptions, for_exemplars, strict=True))

    def search(self, utterance: str, top_k: int = 8, max_exemplars: int = 8, exclude_group: str | None = None,
               vectors: tuple[np.ndarray, np.ndarray] | None = None, allowed: Collection[str] | None = None) -> Hits:
        """`exclude_group`: leave out the exemplars of this dialogue (or file). Building training
        prompts from the dialogues the index was built from, each turn would otherwise find itself.
        `vectors`: the utterance's query vectors from `embed_queries`, when embedded already.
        `allowed`: search only these functions (an SGD dialogue's services, a request's tools)."""
        query, exemplar_query = vectors if vectors is not None else self.embed_queries([utterance])[0]
        description_scores = self.description_vectors @ query
        if allowed is not None:
            description_scores[~np.isin(self._function_names, list(allowed))] = -np.inf
        hits = Hits([(self.functions[row].name, score) for row, score in _top(description_scores, top_k)
                     if score > -np.inf])
        if not self.exemplars:
            return hits
        # restricted to a few functions, exact scores over all rows are as cheap as the vector index
        dense_scores = (self.exemplar_vectors @ exemplar_query if allowed is not None
                        else self._dense_scores(exemplar_query, top_k * max_exemplars, exclude_group))
        tokens = _keyword_tokens([utterance], return_ids=False)[0]
        keyword_scores = self.keywords.get_scores(tokens) if tokens else np.zeros(len(self.exemplars))
        keyword_scores = np.where(keyword_scores > 0, keyword_scores, -np.inf)  # no shared word: no hit
        left_out = self._exemplar_groups == exclude_group if exclude_group is not None else None
        if allowed is not None:
            others = ~np.isin(self._exemplar_owners, list(allowed))
            left_out = others if left_out is None else left_out | others
        if left_out is not None:
            dense_scores[left_out] = -np.inf
            keyword_scores[left_out] = -np.inf
        dense, keyword = ([(name, [(row, score) for row, score in rows if score > -np.inf])
                           for name, rows in self._exemplar_hits(scores, top_k, max_exemplars)]
                          for scores in (dense_scores, keyword_scores))
        dense, keyword = ([(name, rows) for name, rows in hits_ if rows] for hits_ in (dense, keyword))
        hits.exemplars_dense = [(name, rows[0][1]) for name, rows in dense]
        hits.exemplars_keyword = [(name, rows[0][1]) for name, rows in keyword]
        # a function's exemplars from both searches, each exemplar at its best rank in either
        for name in {name for name, _ in dense + keyword}:
            lists = [rows for owner, rows in dense + keyword if owner == name]
            hits.exemplar_rows[name] = [row for row, _ in union(lists)][:max_exemplars]
        return hits

    def candidates(self, hits: Hits, fusion: str = "rrf") -> list[Candidate]:
        lists = [hits.descriptions]
        if self.exemplars:
            lists += [hits.exemplars_dense, hits.exemplars_keyword]
        return [Candidate(self.by_name[name], score,
                          tuple(self.exemplars[row] for row in hits.exemplar_rows.get(name, [])))
                for name, score in fuse(lists, fusion)]

    def retrieve(self, utterance: str, top_k: int = 8, fusion: str = "rrf", max_exemplars: int = 8,
                 exclude_group: str | None = None, vectors: tuple[np.ndarray, np.ndarray] | None = None,
                 allowed: Collection[str] | None = None) -> list[Candidate]:
        return self.candidates(self.search(utterance, top_k, max_exemplars, exclude_group, vectors, allowed), fusion)


def indexable_exemplars(exemplars: Sequence[Exemplar], functions: Sequence[Function]) -> list[Exemplar]:
    """The exemplars with a template and an owner; an owner must be among the functions."""
    known = {function.name for function in functions}
    kept = [e for e in exemplars if e.function is not None and e.template is not None]
    unknown = sorted({e.function for e in kept} - known)
    if unknown:
        raise DataError(f"exemplars name {len(unknown)} function(s) missing from the schemas given, e.g. "
                        f"{unknown[0]!r}: index the schema that defines them too")
    return kept


def vector_index(vectors: np.ndarray):
    """A usearch HNSW index over unit vectors (inner product), keyed by row."""
    from usearch.index import Index

    index = Index(ndim=vectors.shape[1], metric="ip", dtype="f32")
    index.add(np.arange(len(vectors)), vectors)
    return index


def build_index(functions: Sequence[Function], exemplars: Sequence[Exemplar] = (), embedder: str = DEFAULT_EMBEDDER,
                query_instruction: str = "", model=None, vector_index_from: int = VECTOR_INDEX_FROM) -> RetrievalIndex:
    """Embed descriptions and templates and build the keyword index (and, from `vector_index_from`
    templates, the vector index). Exemplars without a template or owner (negatives) are left out.
    `model`: an already loaded embedder named `embedder`."""
    if not functions:
        raise DataError("no functions to index: give at least one schema")
    exemplars = indexable_exemplars(exemplars, functions)
    model = model if model is not None else load_embedder(embedder)
    descriptions = embed(model, [function.description for function in functions])
    templates = [template_text(e.template) for e in exemplars]
    keywords = None
    if exemplars:
        import bm25s

        keywords = bm25s.BM25()
        keywords.index(_keyword_tokens(templates, return_ids=True), show_progress=False)
    template_vectors = embed(model, templates)
    vectors = vector_index(template_vectors) if exemplars and len(exemplars) >= vector_index_from else None
    return RetrievalIndex(functions, exemplars, model, _embedder_id(embedder), descriptions, template_vectors,
                          keywords, query_instruction, vectors)


def _embedder_id(name: str) -> str:
    """An embedded name as it is; a local directory as its absolute path (what a reload needs)."""
    return str(Path(name).resolve()) if resolve_embedder(name) == name and Path(name).is_dir() else name


# --- on disk -------------------------------------------------------------------------------------

def _manifest(path: Path) -> dict | None:
    """The index's manifest, or None when `path` holds no index."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("kind") == INDEX_KIND else None


def _is_index(path: Path) -> bool:
    return _manifest(path) is not None


def save_index(index: RetrievalIndex, directory: Path) -> Path:
    """directory/: manifest.json, tools.json, exemplars.jsonl, descriptions.npy, exemplars.npy,
    keywords/ (BM25). An existing directory is replaced only if it holds an index."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not _is_index(directory):
        raise DataError(f"{directory}: exists and is not a retrieval index; choose another output directory")
    with staged_dir(directory, may_replace=_is_index) as staging:
        write_tools_json(index.functions, staging / "tools.json")
        write_jsonl(staging / "exemplars.jsonl", [_exemplar_record(e) for e in index.exemplars])
        np.save(staging / "descriptions.npy", index.description_vectors)
        np.save(staging / "exemplars.npy", index.exemplar_vectors)
        if index.keywords is not None:
            index.keywords.save(str(staging / "keywords"))
        if index.vectors is not None:
            index.vectors.save(str(staging / "exemplars.usearch"))
        write_json(staging / "manifest.json", {
            "kind": INDEX_KIND, "format": FORMAT_VERSION, "dialogtune_version": dialogtune.__version__,
            "embedder": index.embedder, "dimension": index.dimension, "normalisation": NORMALISATION,
            "query_instruction": index.query_instruction, "keywords": KEYWORDS,
            "functions": len(index.functions), "exemplars": len(index.exemplars),
            "dense_search": "usearch" if index.vectors is not None else "exact",
            "fingerprint": corpus_fingerprint(index.functions, index.exemplars, index.embedder, index.query_instruction),
        })
    return directory


def load_index(directory: Path, embedder: str | None = None, model=None) -> RetrievalIndex:
    """The saved index with its own embedder loaded. Naming another embedder is refused: its
    query vectors would not live in the space of the saved ones."""
    directory = Path(directory)
    manifest = _manifest(directory)
    if manifest is None:
        raise DataError(f"{directory}: not a retrieval index (no manifest.json from `dialogtune index`)")
    if manifest.get("format") != FORMAT_VERSION or manifest.get("normalisation") != NORMALISATION:
        raise DataError(f"{directory}: index format {manifest.get('format')} / normalisation "
                        f"{manifest.get('normalisation')!r} is not this version's ({FORMAT_VERSION} / {NORMALISATION!r});"
                        " build the index again")
    if embedder is not None and _embedder_id(embedder) != manifest["embedder"]:
        raise ModelError(f"{directory}: the index was built with the embedder {manifest['embedder']!r}, not "
                         f"{embedder!r}: query it with the same embedder, or build the index again with the new one")
    functions = read_functions(directory / "tools.json")
    exemplars = [_exemplar_from_record(record) for _, record, error in iter_jsonl(directory / "exemplars.jsonl")
                 if error is None]  # a damaged line changes the fingerprint, refused below
    fingerprint = corpus_fingerprint(functions, exemplars, manifest["embedder"], manifest["query_instruction"])
    if fingerprint != manifest["fingerprint"]:
        raise DataError(f"{directory}: tools.json or exemplars.jsonl changed since the index was built "
                        f"(fingerprint {fingerprint}, manifest {manifest['fingerprint']}); build the index again")
    model = model if model is not None else load_embedder(manifest["embedder"])
    if model.get_embedding_dimension() != manifest["dimension"]:
        raise ModelError(f"{directory}: the embedder {manifest['embedder']!r} now gives "
                         f"{model.get_embedding_dimension()}-dimensional vectors, the index holds "
                         f"{manifest['dimension']}; build the index again")
    keywords = None
    if exemplars:
        import bm25s

        keywords = bm25s.BM25.load(str(directory / "keywords"))
    vectors = None
    if manifest.get("dense_search") == "usearch":
        from usearch.index import Index

        vectors = Index.restore(str(directory / "exemplars.usearch"))
        if vectors is None or len(vectors) != len(exemplars):
            raise DataError(f"{directory}: exemplars.usearch is missing or does not hold the {len(exemplars)} "
                            "templates; build the index again")
    return RetrievalIndex(functions, exemplars, model, manifest["embedder"], np.load(directory / "descriptions.npy"),
                          np.load(directory / "exemplars.npy"), keywords, manifest["query_instruction"], vectors)
