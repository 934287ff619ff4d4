"""The book's code, chapter by chapter: *Build a Large Language Model (From Scratch)*.

Each module holds one chapter's (or appendix's) names with the book's arguments and semantics,
so that a reader's code runs with an import from here instead of the book's `previous_chapters`:

    from build_llm.book.ch05 import generate, load_weights_into_gpt

They are built on the package's own parts (the book's `GPTModel` is `build_llm.GPTModel`); only
where the package deliberately differs (for example its keyword-only `generate`) does a module
here hold the book's variant. The README's "Following the book" section maps chapters to modules.
"""
