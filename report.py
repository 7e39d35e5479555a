"""`python report.py results/demo/llava --out reports/world`: the comparison table and plots of finished runs."""

from reporting.report import main

if __name__ == "__main__":
    main()
