"""The trace format, version 1 (DESIGN.md section 3), as pydantic models.

The models check what one line can check on its own (types, signs, finite numbers, the `kind` tag).
Checks that need the header (expert ids below `num_experts`, `top_k` columns, layer indices) live in
`traces.io`, which knows the header while it streams the records.

`python -m traces.schema` prints the JSON Schema of every line kind.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

FORMAT = "moe-trace"
VERSION = 1

NonNegInt = Annotated[int, Field(ge=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
PosInt = Annotated[int, Field(ge=1)]

# signals a policy may read (`Policy.uses`) that a trace carries once, in the header's model block,
# rather than on every layer record
MODEL_SIGNALS = ("expert_similarity",)


class _Strict(BaseModel):
    """Unknown keys are refused so that a typo in a field name is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelSpec(_Strict):
    """The MoE model a trace came from; what the simulator needs to size the cache and the copies."""

    name: str
    arch: str = Field(description="Hugging Face model_type, e.g. 'mixtral'")
    num_layers: PosInt = Field(description="all decoder layers, MoE or not")
    moe_layers: list[NonNegInt] = Field(description="decoder-layer indices that are MoE; `layer` indexes this list")
    num_experts: PosInt
    top_k: PosInt
    num_shared_experts: NonNegInt = 0
    hidden_size: PosInt
    moe_intermediate_size: PosInt
    dtype: str = Field(description="dtype of the expert weights, e.g. bf16, fp8, int4")
    expert_bytes: PosInt = Field(description="bytes of one routed expert's weights in `dtype`")
    dense_bytes: NonNegInt = Field(description="bytes of all non-expert weights")
    expert_similarity: list[list[list[Finite]]] | None = Field(
        None,
        description="per MoE layer (index into moe_layers), the num_experts x num_experts cosine similarity of the "
        "routed experts' weights (symmetric, diagonal 1), as the runtime computes it; omitted when absent",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if not self.moe_layers:
            raise ValueError("moe_layers: must list at least one MoE layer")
        if sorted(set(self.moe_layers)) != self.moe_layers:
            raise ValueError("moe_layers: must be strictly increasing")
        if self.moe_layers[-1] >= self.num_layers:
            raise ValueError(f"moe_layers: index {self.moe_layers[-1]} is not below num_layers={self.num_layers}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds num_experts={self.num_experts}")
        sim = self.expert_similarity
        if sim is not None:
            n, e = len(self.moe_layers), self.num_experts
            if len(sim) != n:
                raise ValueError(f"expert_similarity: has {len(sim)} matrices, one per MoE layer expected (num_moe_layers={n})")
            for i, rows in enumerate(sim):
                if len(rows) != e:
                    raise ValueError(f"expert_similarity[{i}]: has {len(rows)} rows, num_experts={e}")
                for j, row in enumerate(rows):
                    if len(row) != e:
                        raise ValueError(f"expert_similarity[{i}][{j}]: has {len(row)} entries, num_experts={e}")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A spec without `expert_similarity` dumps exactly as before the field existed (a result file's
        `config.model`, a header written by hand from `model_dump`)."""
        out = handler(self)
        if self.expert_similarity is None:
            out.pop("expert_similarity", None)
        return out

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)


class Recording(BaseModel):
    """How the trace was made. Free-form extras are kept: importers record where their data came from."""

    model_config = ConfigDict(extra="allow")

    tool: str = "moe-offload-lab"
    tool_version: str = "0.1.0"
    torch_version: str | None = None
    transformers_version: str | None = None
    device: str | None = None
    link: Literal["cuda", "emulated"] | None = None
    policy: str | None = Field(None, description="policy spec of the recorded run; null if not offloaded")
    cache: dict[str, Any] | None = None
    prompt_source: str | None = None
    decoding: dict[str, Any] | None = None
    seed: int | None = None
    start_time: str | None = None


class Fields(_Strict):
    """Which optional per-layer fields every layer record carries."""

    probs: bool = False
    lookahead: bool = False
    importance: bool = False
    measured: bool = False
    plan: bool = False


class Header(_Strict):
    kind: Literal["header"] = "header"
    format: Literal["moe-trace"] = FORMAT
    version: Literal[1] = VERSION
    model: ModelSpec
    recording: Recording = Field(default_factory=Recording)
    fields: Fields = Field(default_factory=Fields)

    def carries(self, name: str) -> bool:
        """Whether the trace carries `name`, a signal a policy reads (`Policy.uses`): a layer-record
        field that its `fields` flag promises on every record, or an item of the header's model
        block (`MODEL_SIGNALS`) that is present."""
        if name in MODEL_SIGNALS:
            return getattr(self.model, name) is not None
        return bool(getattr(self.fields, name, False))


class ExpertLoad(_Strict):
    expert: NonNegInt
    start_ns: NonNegInt
    end_ns: NonNegInt


class Measured(_Strict):
    start_ns: NonNegInt
    end_ns: NonNegInt
    stall_ns: NonNegInt = 0
    loads: list[ExpertLoad] = Field(default_factory=list)


class LayerRecord(_Strict):
    """One MoE layer call of one forward step: the router's choice for every token row of the call."""

    kind: Literal["layer"] = "layer"
    step: NonNegInt
    phase: Literal["prefill", "decode"]
    layer: NonNegInt = Field(description="index into header.model.moe_layers")
    tokens: PosInt
    topk: list[list[NonNegInt]] = Field(description="tokens x top_k expert ids as the router chose them")
    weights: list[list[Finite]] = Field(description="tokens x top_k routing weights as the model uses them")
    probs: list[list[Finite]] | None = None
    lookahead: dict[str, list[list[NonNegInt]]] | None = None
    importance: list[Finite] | None = None
    plan: dict[str, Any] | None = None
    measured: Measured | None = None

    @model_validator(mode="after")
    def _shapes(self) -> LayerRecord:
        n = self.tokens
        if (
            n == 1  # the common decode record: check it in one expression
            and len(self.topk) == 1
            and len(self.weights) == 1
            and len(self.topk[0]) == len(self.weights[0]) == len(set(self.topk[0]))
            and self.probs is None
            and self.importance is None
            and self.lookahead is None
        ):
            return self
        if len(self.topk) != n:
            raise ValueError(f"topk: has {len(self.topk)} rows, tokens={n}")
        if len(self.weights) != n:
            raise ValueError(f"weights: has {len(self.weights)} rows, tokens={n}")
        for i, (ids, ws) in enumerate(zip(self.topk, self.weights, strict=True)):
            if len(ids) != len(ws):
                raise ValueError(f"weights[{i}]: has {len(ws)} entries, topk[{i}] has {len(ids)}")
            if len(set(ids)) != len(ids):
                raise ValueError(f"topk[{i}]: repeats an expert id {ids}")
        if self.probs is not None and len(self.probs) != n:
            raise ValueError(f"probs: has {len(self.probs)} rows, tokens={n}")
        if self.importance is not None and len(self.importance) != n:
            raise ValueError(f"importance: has {len(self.importance)} entries, tokens={n}")
        if self.lookahead is not None:
            for key, rows in self.lookahead.items():
                if not (key.isascii() and key.isdigit()):  # '²'.isdigit() is True, int('²') fails
                    raise ValueError(f"lookahead: key {key!r} is not a layer index")
                if len(rows) != n:
                    raise ValueError(f"lookahead.{key}: has {len(rows)} rows, tokens={n}")
        return self


class StepRecord(_Strict):
    kind: Literal["step"] = "step"
    step: NonNegInt
    phase: Literal["prefill", "decode"]
    seq_ids: list[int] = Field(default_factory=list)
    latency_ns: NonNegInt | None = None


class Footer(_Strict):
    kind: Literal["footer"] = "footer"
    steps: NonNegInt
    layer_records: NonNegInt


def json_schema() -> dict[str, Any]:
    """One schema document with a definition per line kind."""
    defs: dict[str, Any] = {}
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{FORMAT} version {VERSION} (one JSON object per line)",
        "oneOf": [],
    }
    for model in (Header, LayerRecord, StepRecord, Footer):
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        defs[model.__name__] = schema
        out["oneOf"].append({"$ref": f"#/$defs/{model.__name__}"})
    out["$defs"] = defs
    return out


def main(argv: list[str] | None = None) -> int:
    from traces.cli import OneLineParser  # here: the schema module stays free of other imports

    parser = OneLineParser(prog="python -m traces.schema", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    json.dump(json_schema(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
