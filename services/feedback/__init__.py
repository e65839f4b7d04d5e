"""The feedback service: people in the loop (labellers' web page and JSON API, labels, H-hat)."""
