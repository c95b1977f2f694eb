"""Support code for the tests: tolerances and hook checks (`helpers`), session models
(`models`), the architecture zoo (`zoo`) and the fuzzing strategies (`fuzz_models`)."""
