"""Every name the package advertises resolves to a real object."""
import pytest

import transformer_jax


@pytest.mark.parametrize("name", transformer_jax.__all__)
def test_public_name_resolves(name):
    assert getattr(transformer_jax, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        transformer_jax.no_such_name  # noqa: B018
