"""Layer 8, pages for people: the HTML debug page."""
