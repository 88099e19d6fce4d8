import sys

total = sum(int(line.split()[0]) for line in open("n.txt"))
open("total", "w").write(f"{total}\n")
