"""Network building blocks, each naming the paper it comes from."""
