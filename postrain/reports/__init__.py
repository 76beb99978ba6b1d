"""Reading finished (or running) runs back: `postrain plot` (curves) and `postrain report` (a Markdown summary)."""
