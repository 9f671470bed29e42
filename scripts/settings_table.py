"""Print the README's settings table from ``service.settings.Settings`` (so the README stays true).

.venv/bin/python scripts/settings_table.py
"""

from __future__ import annotations

from pydantic_core import PydanticUndefined

from service.settings import Settings


def main() -> None:
    print("| variable | default | meaning |")
    print("|---|---|---|")
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "(shipped model)" if name == "model_path" else "(computed)"
        elif field.default is PydanticUndefined:
            default = "(required)"
        else:
            value = field.default
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            default = f"`{value}`" if value not in (None, "") else "unset"
        print(f"| `SNIPSERVE_{name.upper()}` | {default} | {field.description or ''} |")


if __name__ == "__main__":
    main()
