"""The `dialogtune` command: one verb per job.

    dialogtune prepare CONFIG.yaml|DATA [--set key=value ...] [quick flags]
    dialogtune inspect PREPARED_DIR [--index N] [--split validation]
    dialogtune train CONFIG.yaml [--set key=value ...] [--resume | --overwrite]
    dialogtune estimate CONFIG.yaml [--set key=value ...] [--processes N] [--device gpu|cpu] [--json]
    dialogtune export RUN_DIR --merge [-o DIR]
    dialogtune chat RUN_DIR|MODEL [--as NAME] [--user NAME] [sampling flags] [--play N] [--memory FILE [--summary-model MODEL]]
    dialogtune generate RUN_DIR|MODEL --input FILE|PREPARED_DIR --output FILE [sampling flags]
    dialogtune serve RUN_DIR|MODEL [--host 127.0.0.1 --port 8000 --api-key KEY] [--index DIR] [--memory-dir DIR] [--max-batch N]
    dialogtune eval RUN_DIR|MODEL --data CONFIG_OR_FILE [--task respond|summarize] [--limit N] [-o DIR]
    dialogtune eval --compare MODEL_A MODEL_B ... --data CONFIG_OR_FILE
    dialogtune schema SGD_DIR|SCHEMA_JSON|TOOLS_JSON [...] -o tools.json
    dialogtune index SCHEMA [...] [--exemplars SGD_DIR|FILE ...] [--embedder NAME] -o INDEX_DIR
    dialogtune retrieve INDEX_DIR "utterance" [-k 8] [--fusion rrf|sum|union|intersection]
    dialogtune train-embedder CONFIG.yaml [--set key=value ...]
    dialogtune findk INDEX_DIR --queries SGD_DIR|QUERIES.jsonl [...] [-K 16] [--target 0.98] -o DIR
    dialogtune understand RUN_DIR [--index DIR] [--utterance TEXT | --input FILE [-o FILE]]
    dialogtune eval RUN_DIR --task understand --data SGD_DIR [--limit N] [-o DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dialogtune.config import TrainJobConfig, build_config, load_yaml, merge, parse_overrides
from dialogtune.errors import ConfigError, DialogtuneError
from dialogtune.readers import FORMATS
from dialogtune.retrieval.embedder import DEFAULT_EMBEDDER
from dialogtune.retrieval.fusion import FUSIONS
from dialogtune.retrieval.index import VECTOR_INDEX_FROM

if TYPE_CHECKING:  # importing dialogtune.infer loads torch and transformers: only the commands that use it do
    from dialogtune.infer import Sampling


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="read dialogue data and write a tokenized, labelled (packed) dataset",
                       description="Read dialogue data and write a tokenized, exactly labelled dataset.")
    p.add_argument("source", help="a YAML config, or a data file/directory (then the flags describe the job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set task.context.rounds=3 (repeatable)")
    p.add_argument("--format", choices=["auto", *FORMATS], help="input format (default: detected)")
    p.add_argument("--task", choices=["respond", "summarize"])
    p.add_argument("--as", dest="speakers_as", action="append", metavar="SPEAKER",
                   help="the speaker/role the model speaks as (repeatable; '*' for everyone)")
    p.add_argument("--rounds", type=int, help="one example per target turn with N previous turns")
    p.add_argument("--system-prompt")
    p.add_argument("--model", help="hub name, local path, or smollm2-135m-instruct (default)")
    p.add_argument("--template", help="model (the tokenizer's own), chatml, user_assistant, transcript, ...")
    p.add_argument("--max-length", type=int)
    p.add_argument("--pack", action="store_true", default=None, help="pack examples into max-length rows")
    p.add_argument("--validation", type=float, help="share of dialogues held out (default 0.1)")
    p.add_argument("-o", "--output", help="output directory")
    p.add_argument("--strict", action="store_true", default=None, help="stop at the first bad record")
    p.add_argument("--force", action="store_true", help="prepare again even if the output is up to date")


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        ("data", "format"): args.format,
        ("task", "name"): args.task,
        ("task", "as"): args.speakers_as,
        ("task", "context"): {"rounds": args.rounds} if args.rounds is not None else None,
        ("task", "system_prompt"): args.system_prompt,
        ("model", "name"): args.model,
        ("template", "name"): args.template,
        ("max_length",): args.max_length,
        ("pack",): args.pack,
        ("split", "validation"): args.validation,
        ("output",): args.output,
        ("strict",): args.strict,
    }
    tree: dict[str, Any] = {}
    for path, value in flags.items():
        if value is None:
            continue
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def cmd_prepare(args: argparse.Namespace) -> int:
    from dialogtune.prepare import prepare

    source = Path(args.source)
    if source.suffix in (".yaml", ".yml"):
        raw, origin = load_yaml(source), str(source)
    else:
        raw, origin = {"data": {"path": [str(source)]}}, "command line"
    raw = merge(merge(raw, flag_overrides(args)), parse_overrides(args.overrides))
    config = build_config(raw, origin)
    prepare(config, force=args.force)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dialogtune.train.run import train
    from dialogtune.train_summary import finish_run

    raw = merge(load_yaml(Path(args.config)), parse_overrides(args.overrides))
    config = build_config(raw, args.config, schema=TrainJobConfig)
    summary = train(config, overwrite=args.overwrite, resume=args.resume)
    if summary.get("interrupted"):
        print(f"stopped by {summary['interrupted']} at step {summary['step']}; checkpoint {summary['checkpoint']}"
              f" (continue with --resume)", file=sys.stderr)
        return 130 if summary["interrupted"] == "SIGINT" else 143
    finish_run(config, summary)  # sample replies and the eval report: use and evaluation, after training
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    import json

    from dialogtune.estimate import estimate, format_table

    raw = merge(load_yaml(Path(args.config)), parse_overrides(args.overrides))
    config = build_config(raw, args.config, schema=TrainJobConfig)
    result = estimate(config, processes=args.processes, device=args.device, source=args.config)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_table(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dialogtune.train.export import export_merged

    if not args.merge:
        print("dialogtune export: nothing to do: pass --merge to fold the LoRA adapter into the base model",
              file=sys.stderr)
        return 2
    print(f"merged model written to {export_merged(Path(args.run), args.output)}")
    return 0


def _sampling_flags(p, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--seed", type=int)


def sampling_from_flags(args: argparse.Namespace) -> Sampling:
    """The Sampling that _sampling_flags describe (chat, generate and eval share them)."""
    from dialogtune.infer import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                    max_new_tokens=args.max_new_tokens, seed=args.seed)


def cmd_chat(args: argparse.Namespace) -> int:
    from dialogtune.chat import run_chat

    return run_chat(args.model, sampling=sampling_from_flags(args), speaker_as=args.speaker_as, user=args.user,
                    system=args.system, play=args.play, reuse_cache=not args.no_cache,
                    load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit,
                    memory=Path(args.memory) if args.memory else None, summary_model=args.summary_model)


def cmd_generate(args: argparse.Namespace) -> int:
    from dialogtune.generate import run_generate

    return run_generate(args.model, Path(args.input), Path(args.output), sampling=sampling_from_flags(args),
                        split=args.split, batch_size=args.batch_size)


def cmd_serve(args: argparse.Namespace) -> int:
    from dialogtune.serve import run_serve

    return run_serve(args.model, host=args.host, port=args.port, api_key=args.api_key, model_id=args.model_id,
                     queue_size=args.queue, timeout=args.timeout, index=args.index, memory_dir=args.memory_dir,
                     max_batch=args.max_batch)


def cmd_eval(args: argparse.Namespace) -> int:
    from dialogtune.evaluate.run import compare, evaluate

    if args.task == "understand":
        return eval_understand(args)

    options = {"split": args.split, "limit": args.limit, "sampling": sampling_from_flags(args),
               "batch_size": args.batch_size}
    if args.compare:
        compare(args.compare, args.data, args.task, Path(args.output or "eval-compare"), **options)
    elif args.model:
        evaluate(args.model, args.data, args.task, out=Path(args.output) if args.output else None, **options)
    else:
        raise ConfigError("name a model to evaluate, or several with --compare")
    return 0


def eval_understand(args: argparse.Namespace) -> int:
    from dialogtune.evaluate.understand import evaluate_understanding
    from dialogtune.readers import sgd
    from dialogtune.understand import load_understander

    if args.compare or not args.model:
        raise ConfigError("eval --task understand takes one run (no --compare)")
    understander = load_understander(args.model, args.index)
    if args.dialogue_services:
        understander.prompts.dialogue_services = True
    out = Path(args.output or Path(args.model) / "eval" / f"understand-{Path(args.data).name}")
    report = evaluate_understanding(understander, sgd.read(Path(args.data)), out, args.limit)
    for name, s in report["groups"].items():
        if s["turns"]:
            print(f"{name:6} turns {s['turns']:<5} function {s['function_accuracy']:.3f}  slot F1 "
                  f"{s['slot_f1'] if s['slot_f1'] is not None else float('nan'):.3f}  JGA "
                  f"{s['joint_goal_accuracy'] if s['joint_goal_accuracy'] is not None else float('nan'):.3f}")
    print(f"latency p50 {report['latency']['p50_ms']} ms, p95 {report['latency']['p95_ms']} ms; report: {out / 'report.md'}")
    return 0


def cmd_understand(args: argparse.Namespace) -> int:
    import json

    from dialogtune.understand import Conversation, load_understander, run_batch

    understander = load_understander(args.model, args.index)
    if args.utterance is not None:
        result = understander.turn(Conversation(), args.utterance)
        print(json.dumps(result.call.as_dict(), ensure_ascii=False))
        return 0
    if args.input:
        summary = run_batch(understander, Path(args.input), Path(args.output) if args.output else None)
        print(f"{summary['turns']} user turns, latency p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms"
              + (f" -> {args.output}" if args.output else ""), file=sys.stderr)
        return 0
    conversation = Conversation()
    print("Type a user turn (or 'system: TEXT' for the system's reply; Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            return 0
        if line.lower().startswith("system:"):
            conversation.turns.append(("SYSTEM", line.split(":", 1)[1].strip()))
        elif line:
            result = understander.turn(conversation, line)
            print(json.dumps(result.call.as_dict(), ensure_ascii=False), f"({result.seconds * 1000:.0f} ms)")


def cmd_schema(args: argparse.Namespace) -> int:
    from dialogtune.retrieval.schemas import load_functions, service_of, write_tools_json

    functions = load_functions(Path(path) for path in args.schemas)
    write_tools_json(functions, Path(args.output))
    services = {service_of(function.name) for function in functions}
    print(f"wrote {len(functions)} functions from {len(services)} services to {args.output}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    import time

    from dialogtune.retrieval.exemplars import read_exemplars
    from dialogtune.retrieval.index import build_index, save_index
    from dialogtune.retrieval.schemas import load_functions

    functions = load_functions(Path(path) for path in args.schemas)
    exemplars, notes = read_exemplars(map(Path, args.exemplars), functions)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    started = time.perf_counter()
    index = build_index(functions, exemplars, embedder=args.embedder, query_instruction=args.query_instruction,
                        vector_index_from=args.vector_index_from)
    save_index(index, Path(args.output))
    search = "a usearch vector index" if index.vectors is not None else "exact dense search"
    print(f"indexed {len(index.functions)} functions and {len(index.exemplars)} exemplar templates with "
          f"{index.embedder} ({search}) in {time.perf_counter() - started:.1f}s -> {args.output}")
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from dialogtune.retrieval.index import load_index

    index = load_index(Path(args.index), embedder=args.embedder)
    for rank, candidate in enumerate(index.retrieve(args.utterance, top_k=args.k, fusion=args.fusion), start=1):
        print(f"{rank}. {candidate.function.name}  {candidate.score:.4f}  {candidate.function.description}")
        for exemplar in candidate.exemplars[:args.show_exemplars]:
            print(f"     {exemplar.template}")
    return 0


def cmd_findk(args: argparse.Namespace) -> int:
    from dialogtune.retrieval.findk import find_k, read_queries, write_report
    from dialogtune.retrieval.index import load_index

    index = load_index(Path(args.index), embedder=args.embedder)
    results, misses = find_k(index, read_queries(Path(path) for path in args.queries), max_k=args.K,
                             target=args.target, fusion=args.fusion, max_exemplars=args.max_exemplars,
                             drop_seen=args.drop_seen)
    write_report(results, misses, Path(args.output))
    for group in ("seen", "unseen"):
        for name in ("descriptions", "exemplars", "hybrid"):
            summary = results["groups"][group][name]
            if summary["queries"]:
                reached = (f"k={summary['smallest_k']}" if summary["smallest_k"]
                           else f"not reached (best {summary['best_recall']:.3f})")
                print(f"{group:6} {name:12} n={summary['queries']:<5} recall@{args.K} {summary['recall'][-1]:.3f}  "
                      f"{args.target} at {reached}")
    print(f"{results['queries']} queries ({results['dropped_seen']} dropped as seen), latency p50 "
          f"{results['latency_ms']['p50']:.1f} ms p95 {results['latency_ms']['p95']:.1f} ms, "
          f"{results['misses']} misses -> {args.output}")
    return 0


def cmd_train_embedder(args: argparse.Namespace) -> int:
    from dialogtune.retrieval.finetune import describe, load_config, train_embedder

    summary = train_embedder(load_config(Path(args.config), parse_overrides(args.overrides)))
    print(describe(summary))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from dialogtune.inspect import inspect

    print(inspect(Path(args.directory), args.index, args.split))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dialogtune", description="Turn conversations into conversational models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _prepare_parser(sub)
    p = sub.add_parser("inspect", help="show one prepared example with its trained tokens marked")
    p.add_argument("directory", help="a directory written by `dialogtune prepare`")
    p.add_argument("--index", type=int, default=0, help="which example (default 0)")
    p.add_argument("--split", default="train", choices=["train", "validation"])
    p = sub.add_parser("train", help="fine-tune a model on a job config (prepares the data first, cached)")
    p.add_argument("config", help="the job's YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete what run_dir holds and start over")
    p = sub.add_parser("estimate", help="memory per device for a training job, before renting GPUs")
    p.add_argument("config", help="the job's YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.per_device_train_batch_size=8 (repeatable)")
    p.add_argument("--processes", type=int, default=1, metavar="N", help="training processes, one per GPU (default 1)")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="where training runs (default gpu)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p = sub.add_parser("export", help="write a merged full model from a LoRA run")
    p.add_argument("run", help="a run directory")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base model")
    p.add_argument("-o", "--output", help="output directory (default RUN/merged)")
    p = sub.add_parser("chat", help="talk to a trained run (or any chat model) in the terminal")
    p.add_argument("model", help="a run directory, its final/ or merged/, or a model name/path")
    p.add_argument("--as", dest="speaker_as",
                   help="the character the model speaks as (transcript runs; memory runs: default their second speaker)")
    p.add_argument("--user", help="your name in the conversation (default User; memory runs: their first speaker)")
    p.add_argument("--system", help="a system prompt / persona (default: the one used in training)")
    _sampling_flags(p, temperature=0.7, max_new_tokens=128)
    p.add_argument("--play", type=int, default=0, metavar="N", help="N turns against a scripted user, then exit")
    p.add_argument("--no-cache", action="store_true", help="re-read the whole conversation every turn")
    p.add_argument("--load-in-8bit", action="store_true")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--memory", metavar="FILE",
                   help="keep the chat in FILE, saved after every turn and loaded when it exists: a memory run's"
                        " memory, or any other model's conversation (earlier sessions summarised once it no longer"
                        " fits the context)")
    p.add_argument("--summary-model", metavar="MODEL",
                   help="with --memory on a model that is not a memory run: who writes the summaries (a summarize"
                        " run or any chat model; default the chat model itself)")
    p = sub.add_parser("generate", help="replies for a JSONL of conversations or a prepared validation split")
    p.add_argument("model", help="a run directory, its final/ or merged/, or a model name/path")
    p.add_argument("--input", required=True, help="JSONL with 'messages', or a prepared dataset directory")
    p.add_argument("--output", required=True, help="JSONL to write: every input field plus 'reply'")
    p.add_argument("--split", default="validation", help="with a prepared directory: which split")
    p.add_argument("--batch-size", type=int, default=8)
    _sampling_flags(p, temperature=0.0, max_new_tokens=128)
    p = sub.add_parser("serve", help="an OpenAI-compatible chat server with a chat page at /")
    p.add_argument("model", help="a run directory, its final/ or merged/, or a model name/path")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on API requests")
    p.add_argument("--model-id", help="the model name clients use (default: the run directory's name)")
    p.add_argument("--queue", type=int, default=8, help="requests that may wait; more get a 503 (default 8)")
    p.add_argument("--max-batch", type=int, default=16, help="chat replies generated together (continuous"
                   " batching); 1: one at a time (default 16)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one reply may take (default 120)")
    p.add_argument("--index", help="an understand run's retrieval index (default: the one it was trained with)")
    p.add_argument("--memory-dir", help="memory runs: where each user's memory is kept (default RUN/memories);"
                   " chat models: keep one summary memory per request `user` here")
    p = sub.add_parser("eval", help="evaluate by generation: BLEU/ROUGE/distinct/perplexity, report.json and .md")
    p.add_argument("model", nargs="?", help="a run directory or a model name/path")
    p.add_argument("--data", required=True, help="a job YAML (its validation split) or a data file (all of it)")
    p.add_argument("--task", choices=["respond", "summarize", "understand"], help="default: the run's task")
    p.add_argument("--index", help="understand: the retrieval index (default: the one the run was trained with)")
    p.add_argument("--dialogue-services", action="store_true",
                   help="understand: offer only the functions of each dialogue's services (as DSTC8 evaluates)")
    p.add_argument("--split", default="validation")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples (understand: N dialogues, a fixed sample by a hash of their ids)")
    p.add_argument("-o", "--output", help="output directory (default RUN/eval/DATA)")
    p.add_argument("--compare", nargs="+", metavar="MODEL", help="evaluate several models on the same samples (refused if their samples differ)")
    p.add_argument("--batch-size", type=int, default=8)
    _sampling_flags(p, temperature=0.0, max_new_tokens=128)
    p = sub.add_parser("schema", help="write the functions of SGD schemas or tools JSON files as one OpenAI tools JSON")
    p.add_argument("schemas", nargs="+", metavar="SCHEMA",
                   help="an SGD split directory, its schema.json, or a tools JSON (several are merged)")
    p.add_argument("-o", "--output", required=True, help="the tools JSON to write")
    p = sub.add_parser("index", help="build a hybrid retrieval index over function schemas and exemplars")
    p.add_argument("schemas", nargs="+", metavar="SCHEMA",
                   help="an SGD split directory, its schema.json, or a tools JSON (several are merged)")
    p.add_argument("--exemplars", action="append", default=[], metavar="SOURCE",
                   help="an SGD split directory or dialogues file, or a hand-written exemplars JSON/YAML (repeatable)")
    p.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                   help="a sentence-transformers model name or directory (default: the embedded minilm-l6-v2)")
    p.add_argument("--query-instruction", default="",
                   help="a prefix for queries against descriptions, for models trained with one (default none)")
    p.add_argument("--vector-index-from", type=int, default=VECTOR_INDEX_FROM, metavar="N",
                   help="from N templates, dense search goes through a usearch HNSW index (default 50000)")
    p.add_argument("-o", "--output", required=True, help="the index directory to write")
    p = sub.add_parser("retrieve", help="the candidate functions for an utterance, from an index")
    p.add_argument("index", help="a directory written by `dialogtune index`")
    p.add_argument("utterance")
    p.add_argument("-k", type=int, default=8, help="functions taken from each search before fusion (default 8)")
    p.add_argument("--fusion", default="rrf", choices=FUSIONS)
    p.add_argument("--embedder", help="refuse to run unless the index was built with this embedder")
    p.add_argument("--show-exemplars", type=int, default=3, metavar="N", help="exemplars shown per function (default 3)")
    p = sub.add_parser("findk", help="recall of the gold function for k = 1..K: how many candidates to retrieve")
    p.add_argument("index", help="a directory written by `dialogtune index`")
    p.add_argument("--queries", nargs="+", required=True, metavar="DATA",
                   help="SGD split directories or dialogues files, or JSONL of {\"utterance\", \"function\"}")
    p.add_argument("-K", type=int, default=16, help="the largest k (default 16)")
    p.add_argument("--target", type=float, default=0.98, help="the recall to reach (default 0.98)")
    p.add_argument("--fusion", default="rrf", choices=FUSIONS)
    p.add_argument("--max-exemplars", type=int, default=8, help="templates kept per function (default 8)")
    p.add_argument("--drop-seen", action="store_true",
                   help="leave out queries whose utterance the index holds, instead of refusing them")
    p.add_argument("--embedder", help="refuse to run unless the index was built with this embedder")
    p.add_argument("-o", "--output", required=True, help="the report directory to write")
    p = sub.add_parser("train-embedder", help="fine-tune the retrieval embedder on exemplars (hard negatives mined)")
    p.add_argument("config", help="the YAML config (embedder, schemas, exemplars, pairs, validation, train, output)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=300 (repeatable)")
    p = sub.add_parser("understand", help="turn user turns into function calls with an understand run")
    p.add_argument("model", help="a run trained with task.name: understand")
    p.add_argument("--index", help="the retrieval index (default: the one the run was trained with)")
    p.add_argument("--utterance", help="understand one user turn and print its call as JSON")
    p.add_argument("--input", help='a JSONL of {"messages": [{"role", "content"}]}: a call per user turn')
    p.add_argument("-o", "--output", help="with --input: the JSONL of calls to write (default: stdout)")
    args = parser.parse_args(argv)
    handlers = {"prepare": cmd_prepare, "inspect": cmd_inspect, "train": cmd_train, "estimate": cmd_estimate,
                "export": cmd_export,
                "chat": cmd_chat, "generate": cmd_generate, "serve": cmd_serve, "eval": cmd_eval,
                "schema": cmd_schema, "index": cmd_index, "retrieve": cmd_retrieve, "train-embedder": cmd_train_embedder,
                "findk": cmd_findk, "understand": cmd_understand}
    try:
        return handlers[args.command](args)
    except DialogtuneError as err:  # input or setup the user can fix: a message, not a traceback
        print(f"dialogtune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
