"""mkdocs hook (mkdocs.yml ``hooks:``): the repository files that docs/ links to become part of the site.

docs/*.md link to files outside docs/ (``../benchmarks/results/grid.md``, ``../README.md``) so that the links
work where most readers read them, on GitHub; mkdocs knows only ``docs_dir`` and reports each such link as a
file not found.  Silencing that warning (``validation: links: not_found: ignore``) would also silence a link
to a file that does not exist, which is what the strict build is for.  So instead:

- ``on_files`` follows the links of every page, and of every page it adds, and puts each repository file
  that is linked and exists into the site at ``repo/<its path in the repository>``: a markdown file becomes a
  page (outside the nav unless mkdocs.yml names it there; its own links are checked in turn), any other file
  is copied as it is, and a folder becomes a page listing its files;
- a markdown treeprocessor, which runs just before mkdocs' own link check, points each link at a repository
  file to that file's place in the site.

A link to a file that does not exist is left as written, so mkdocs' own check reports it ("... is not found
among documentation files"), and ``mkdocs build --strict`` fails.

:class:`SphinxRoles` is a griffe extension (mkdocs.yml names it for mkdocstrings): the docstrings are prose
with reStructuredText's roles (``:func:`save```), which markdown would print as written.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import griffe
import markdown
from mkdocs.structure.files import File, Files, InclusionLevel

# where the repository's files live in the site
PREFIX = "repo/"
# link targets in markdown: inline links and images, reference definitions, raw HTML href/src
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)|^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)|\b(?:href|src)=\"([^\"]+)\"",
                  re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
# names in a folder that are not the project's (caches, editor and VCS files)
SKIP = re.compile(r"^(\.|__pycache__$)")
# a Sphinx role in a docstring: :func:`save`, :class:`~mobilenets.model.MobileNetV1Features`
ROLE = re.compile(r":(?:py:)?(?:attr|class|const|data|exc|func|meth|mod|obj):`(~?)([^`]+)`")


class _Site:
    """Where repository paths are in the site, for one build."""

    def __init__(self, config):
        self.root = Path(config.config_file_path).resolve().parent
        self.docs = Path(config.docs_dir).resolve()
        self.docs_rel = self.docs.relative_to(self.root).as_posix()
        self.repo_of: dict[str, str] = {}  # site src_uri -> repository path, for the files this hook added
        self.page: File | None = None  # the page being rendered

    def repo_path(self, file: File) -> str:
        return self.repo_of.get(file.src_uri) or posixpath.join(self.docs_rel, file.src_uri)

    def target(self, file: File, url: str) -> str | None:
        """The repository path ``url`` (a link in ``file``) points at, if it is a relative link to a file."""
        parts = urlsplit(url)
        if parts.scheme or parts.netloc or not parts.path or parts.path.startswith(("/", "\\")):
            return None
        path = posixpath.normpath(posixpath.join(posixpath.dirname(self.repo_path(file)), unquote(parts.path)))
        return None if path == ".." or path.startswith("../") else path

    def site_path(self, repo_path: str) -> str | None:
        """The src_uri that holds ``repo_path`` in the site; None for a path that does not exist."""
        if repo_path.startswith(self.docs_rel + "/"):
            return None  # a docs/ file: mkdocs finds it itself (and reports it if it is missing)
        full = self.root / repo_path
        if full.is_dir():
            return PREFIX + ("" if repo_path == "." else repo_path + "/") + "index.md"
        return PREFIX + repo_path if full.is_file() else None


_site: _Site | None = None


def on_config(config):
    global _site
    _site = _Site(config)
    config.markdown_extensions.append(_RepositoryLinks())
    return config


def _links(text: str):
    for match in LINK.finditer(FENCE.sub("", text)):
        yield next(group for group in match.groups() if group)


def _listing(repo_path: str) -> str:
    folder = _site.root / repo_path
    entries = sorted(p for p in folder.iterdir() if not SKIP.match(p.name))
    lines = [f"# {repo_path}/", "", f"The files in `{repo_path}/` of the repository.", ""]
    lines += [f"- [{p.name}{'/' if p.is_dir() else ''}]({p.name}{'/' if p.is_dir() else ''})" for p in entries]
    return "\n".join(lines) + "\n"


def on_files(files: Files, config) -> Files:
    nav_names = set(_nav_files(config.nav or []))
    todo = [f for f in files if f.is_documentation_page()]
    while todo:
        file = todo.pop()
        text = file.content_string
        for url in _links(text):
            repo_path = _site.target(file, url)
            src_uri = repo_path and _site.site_path(repo_path)
            if not src_uri or files.get_file_from_path(src_uri) is not None:
                continue
            inclusion = InclusionLevel.INCLUDED if src_uri in nav_names else InclusionLevel.NOT_IN_NAV
            if src_uri.endswith("/index.md") and (_site.root / repo_path).is_dir():
                added = File.generated(config, src_uri, content=_listing(repo_path), inclusion=inclusion)
                _site.repo_of[src_uri] = posixpath.join(repo_path, "index.md")
            else:
                added = File.generated(config, src_uri, abs_src_path=str(_site.root / repo_path),
                                       inclusion=inclusion)
                _site.repo_of[src_uri] = repo_path
            files.append(added)
            if added.is_documentation_page():
                todo.append(added)
    return files


def _nav_files(nav):
    for item in nav if isinstance(nav, list) else [nav]:
        if isinstance(item, dict):
            for value in item.values():
                yield from _nav_files(value)
        elif isinstance(item, str):
            yield item


def on_page_markdown(text, page, config, files):
    _site.page = page.file  # the treeprocessor resolves links relative to it
    return text


class _Rewrite(markdown.treeprocessors.Treeprocessor):
    def run(self, root):
        file = _site.page
        if file is None:
            return root
        for element in root.iter():
            key = {"a": "href", "img": "src"}.get(element.tag)
            url = element.get(key) if key else None
            repo_path = url and _site.target(file, url)
            src_uri = repo_path and _site.site_path(repo_path)
            if repo_path and repo_path.startswith(_site.docs_rel + "/") and file.src_uri in _site.repo_of:
                src_uri = repo_path[len(_site.docs_rel) + 1:]  # an added page's link into docs/
            if not src_uri:
                continue  # mkdocs' own check decides (a missing file stays a warning)
            parts = urlsplit(url)
            relative = posixpath.relpath(src_uri, posixpath.dirname(file.src_uri) or ".")
            element.set(key, urlunsplit(("", "", relative, parts.query, parts.fragment)))
        return root


class _RepositoryLinks(markdown.Extension):
    def extendMarkdown(self, md):
        # mkdocs' link check ("relpath") has priority 0; higher runs first
        md.treeprocessors.register(_Rewrite(md), "mobilenets_repository_links", 1)


class SphinxRoles(griffe.Extension):
    """Sphinx roles in docstrings as code: :func:`save` as ``save``, :class:`~a.b.C` as ``C`` (as Sphinx shows it)."""

    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(
                lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", obj.docstring.value)
