"""``python -m ssl_kit.noisy_student``: the Noisy Student command of ``ssl_kit.semi.noisy_student``."""

from ssl_kit.semi.noisy_student import main

if __name__ == "__main__":
    main()
