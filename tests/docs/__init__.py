"""The docs: generated reference pages, every repository path named exists, the README's snippets run."""
