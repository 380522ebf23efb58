"""Pure-torch references of every fastft op, one module per op (fastft.reference.<op>.<op>): the
oracle in tests and the fallback backend. Functions are not re-exported here, so that each name
stays its module (fastft.reference.adapter is the module, not the function)."""
