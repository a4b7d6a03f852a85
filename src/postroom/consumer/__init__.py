"""Consumer: see DESIGN.md."""
