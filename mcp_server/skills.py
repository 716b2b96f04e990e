"""The realign skill over MCP, by the Skills extension (SEP-2640).

Extension id ``io.modelcontextprotocol/skills``. Every skill file (SKILL.md,
workflow.md, templates.md, docs/*.md, as :func:`realign.skill.skill_files` lists them)
is a resource ``skill://<name>/<path>``, read with ``resources/read``. Two methods:

* ``skills/list`` -> ``{"skills": [Skill], "ttlMs", "cacheScope"}``
* ``skills/get {"uri": "skill://<name>/SKILL.md"}`` -> ``{"skill": Skill, ...}``; an
  unknown URI is error -32602 (Invalid params).

A ``Skill`` entry is ``{"uri", "frontmatter", "resources": [{"uri", "digest", "size"}]}``:
the SKILL.md YAML frontmatter as JSON and a complete file manifest whose ``digest`` is
``sha256:<64 hex>`` of the file's raw bytes and ``size`` its length in bytes. Digests
are computed from disk at each call and files are served as read from disk at each
read, so the manifest and the content agree. ``resources/directory/read`` is not
implemented (the optional ``directoryRead`` setting is not declared).

The 2.x Python SDK has no helper for this extension, so it is built on the SDK's
``Extension``/``MethodBinding``/``ResourceBinding``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from mcp.server.context import ServerRequestContext
from mcp.server.extension import Extension, MethodBinding, ResourceBinding
from mcp.server.mcpserver.resources import Resource
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    CacheableResult,
    PaginatedRequest,
    PaginatedRequestParams,
    PaginatedResult,
    Request,
    RequestParams,
)
from mcp_types._types import MCPModel, ResultType
from pydantic import Field

log = logging.getLogger(__name__)

EXTENSION_ID = "io.modelcontextprotocol/skills"
SCHEME = "skill"
#: How long a client may cache a listing or an entry (the files change only on upgrade).
TTL_MS = 300_000
MIME = {".md": "text/markdown", ".txt": "text/plain", ".py": "text/x-python",
        ".json": "application/json", ".yaml": "application/yaml", ".yml": "application/yaml"}


class SkillResource(MCPModel):
    """One file of a skill: its resource URI, ``sha256:{hex}`` digest and size in bytes."""

    uri: str
    digest: str
    size: int


class Skill(MCPModel):
    uri: str = Field(description="resource URI of the skill's SKILL.md")
    frontmatter: dict[str, Any]
    resources: list[SkillResource]


class ListSkillsResult(PaginatedResult, CacheableResult):
    skills: list[Skill]
    result_type: ResultType = "complete"


class GetSkillParams(RequestParams):
    uri: str


class GetSkillResult(CacheableResult):
    skill: Skill
    result_type: ResultType = "complete"


class ListSkillsRequest(PaginatedRequest[Literal["skills/list"]]):
    """Client side of ``skills/list`` (for ``ClientSession.send_request``)."""

    method: Literal["skills/list"] = "skills/list"


class GetSkillRequest(Request[GetSkillParams, Literal["skills/get"]]):
    """Client side of ``skills/get``."""

    method: Literal["skills/get"] = "skills/get"


def parse_frontmatter(text: str, file: Path) -> dict[str, Any]:
    """The YAML frontmatter of a SKILL.md (between the leading ``---`` lines) as JSON."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        raise ValueError(f"{file}: SKILL.md does not start with YAML frontmatter ('---')")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise ValueError(f"{file}: the frontmatter has no closing '---'") from None
    data = yaml.safe_load("\n".join(lines[1:end])) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{file}: the frontmatter is not a mapping")
    for key in ("name", "description"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"{file}: frontmatter field '{key}' is missing or empty")
    # YAML dates and the like become strings: the entry must be JSON.
    return json.loads(json.dumps(data, default=str))


def digest(data: bytes) -> str:
    """``sha256:`` + 64 lowercase hex digits of the raw bytes (SEP-2640 digest format)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class SkillFile(Resource):
    """A skill file read from disk at each read: UTF-8 text, or bytes when not UTF-8."""

    path: Path

    async def read(self) -> str | bytes:
        data = self.path.read_bytes()
        try:
            return data.decode("utf-8")  # no newline translation: the bytes round-trip
        except UnicodeDecodeError:
            return data


@dataclass(frozen=True)
class ServedSkill:
    """A skill directory served under ``skill://<name>/``."""

    name: str
    root: Path
    files: tuple[Path, ...]  # relative paths, SKILL.md first

    @property
    def base_uri(self) -> str:
        return f"{SCHEME}://{self.name}"

    @property
    def uri(self) -> str:
        return f"{self.base_uri}/SKILL.md"

    def file_uri(self, rel: Path) -> str:
        return f"{self.base_uri}/{rel.as_posix()}"

    def entry(self) -> Skill:
        """The SEP-2640 entry, digests computed from the files now."""
        res = []
        front: dict[str, Any] = {}
        for rel in self.files:
            data = (self.root / rel).read_bytes()
            if rel.as_posix() == "SKILL.md":
                front = parse_frontmatter(data.decode("utf-8"), self.root / rel)
            res.append(SkillResource(uri=self.file_uri(rel), digest=digest(data), size=len(data)))
        return Skill(uri=self.uri, frontmatter=front, resources=res)


def load_skill(root: Path, files: Sequence[Path]) -> ServedSkill:
    """Describe the skill at ``root`` (its name from the SKILL.md frontmatter)."""
    skill_md = root / "SKILL.md"
    front = parse_frontmatter(skill_md.read_text(encoding="utf-8"), skill_md)
    ordered = [Path("SKILL.md")] + [Path(f) for f in files if Path(f).as_posix() != "SKILL.md"]
    return ServedSkill(name=front["name"], root=root, files=tuple(ordered))


class SkillsExtension(Extension):
    """SEP-2640 skills: resources for every file plus ``skills/list`` and ``skills/get``."""

    identifier = EXTENSION_ID

    def __init__(self, skills: Sequence[ServedSkill]) -> None:
        self.skills = list(skills)

    def settings(self) -> dict[str, Any]:
        return {}  # no optional features (directoryRead is not implemented)

    def resources(self) -> Sequence[ResourceBinding]:
        out = []
        for s in self.skills:
            front = s.entry().frontmatter
            for rel in s.files:
                is_main = rel.as_posix() == "SKILL.md"
                out.append(ResourceBinding(resource=SkillFile(
                    uri=s.file_uri(rel), path=s.root / rel,
                    name=front["name"] if is_main else rel.as_posix(),
                    title=None if is_main else f"{s.name}: {rel.as_posix()}",
                    description=front["description"] if is_main else None,
                    mime_type=MIME.get(rel.suffix.lower(), "text/plain"))))
        return out

    def methods(self) -> Sequence[MethodBinding]:
        return [
            MethodBinding(method="skills/list", params_type=PaginatedRequestParams,
                          handler=self._list),
            MethodBinding(method="skills/get", params_type=GetSkillParams, handler=self._get),
        ]

    async def _list(self, ctx: ServerRequestContext[Any, Any],
                    params: PaginatedRequestParams | None) -> ListSkillsResult:
        # One page: the catalogue is one skill. An unknown cursor still gets the full list.
        return ListSkillsResult(skills=[s.entry() for s in self.skills], ttl_ms=TTL_MS,
                                cache_scope="public")

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: GetSkillParams) -> GetSkillResult:
        for s in self.skills:
            if params.uri == s.uri:
                return GetSkillResult(skill=s.entry(), ttl_ms=TTL_MS, cache_scope="public")
        served = ", ".join(s.uri for s in self.skills) or "none"
        raise MCPError(code=INVALID_PARAMS,
                       message=f"No skill is served at {params.uri} (served: {served})")


def realign_skill() -> list[ServedSkill]:
    """The realign skill from this installation, or no skill (with a warning) if absent."""
    from realign.skill import skill_files, skill_root

    try:
        root = skill_root()
        return [load_skill(root, skill_files(root))]
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        log.warning("the realign skill is not served: %s", e)
        return []
